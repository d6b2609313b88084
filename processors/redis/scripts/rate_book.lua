-- KEYS[1] GCRA key, KEYS[2] the guard's sorted set; ARGV: slot spacing in us, the calling
-- thread's previous request ('' if none). Marks that request answered, books a slot, returns
-- the us to wait for it.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[2], 'XX', 'LT', string.format('%d', now), ARGV[2])
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local slot = math.max(now, tat)
local nxt = slot + tonumber(ARGV[1])
-- keep the key until every booked slot has passed, plus a second
redis.call('SET', KEYS[1], string.format('%d', nxt), 'PX', math.ceil((nxt - now) / 1000) + 1000)
return {string.format('%d', slot - now)}
