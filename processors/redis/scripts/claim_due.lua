-- KEYS: deferred, data, lease. ARGV: now ('+inf' for all), limit, lease_until, wall_now, the key
-- prefix ('' on a cluster: every due entry is claimed, the caller checks the decisions' states
-- and hands the finished ones to ``unclaim``).
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[4])
for _, did in ipairs(expired) do
  local raw = redis.call('HGET', KEYS[2], did)
  redis.call('ZREM', KEYS[3], did)
  if raw then
    local due = string.match(raw, '^(%d+)|')
    redis.call('ZADD', KEYS[1], due, did)
  end
end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {}
for _, did in ipairs(ids) do
  redis.call('ZREM', KEYS[1], did)
  local raw = redis.call('HGET', KEYS[2], did)
  if raw then
    local state = 'deferred'
    if ARGV[5] ~= '' then
      local sep = string.find(raw, '|', 1, true)
      local user = cjson.decode(string.sub(raw, sep + 1))['user_id']
      state = redis.call('HGET', ARGV[5] .. '{' .. user .. '}:d:' .. did, 's')
    end
    if state == 'deferred' or state == 'reserved' or state == 'calling' then
      redis.call('ZADD', KEYS[3], ARGV[3], did)
      table.insert(out, raw)
    else
      redis.call('HDEL', KEYS[2], did)  -- finished meanwhile (or expired): nothing to send
    end
  end
end
return out
