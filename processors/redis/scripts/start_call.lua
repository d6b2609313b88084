-- KEYS: decision, contact. ARGV: token, call lease, the phone key prefix, as_of (-1: now), and
-- on a cluster (prefix ''), the number whose keyword consent the caller read and that consent.
local owner = redis.call('HGET', KEYS[1], 't')
local state = redis.call('HGET', KEYS[1], 's')
if owner == ARGV[1] and state == 'calling' then
  -- this attempt's own earlier call whose answer was lost (Redis went away): the gateway has
  -- not been called yet (that comes after this script answers), so go ahead
  redis.call('HSET', KEYS[1], 'l', now + ARGV[2])
  return 'ok'
end
if owner ~= ARGV[1] or state ~= 'reserved' then return 'lost' end
local c = redis.call('HGET', KEYS[1], 'c')
local as_of = tonumber(ARGV[4])
if c and (as_of < 0 or tonumber(redis.call('HGET', KEYS[1], 'ca') or '0') <= as_of) then
  return 'cancelled:' .. c
end
-- consent once more, atomically with the call: a STOP answered since the policy's check wins
local v = redis.call('HGET', KEYS[2], 'v')
if v then
  local ok, rec = pcall(cjson.decode, v)
  if ok and type(rec) == 'table' then
    local consent = type(rec['consent']) == 'table' and rec['consent']['status'] or nil
    if consent ~= 'opted_in' then
      return 'cancelled:' .. (consent == 'opted_out' and 'opted_out' or 'no_consent')
    end
    if type(rec['phone']) == 'string' then
      local s = ARGV[6]
      if ARGV[3] ~= '' then
        s = redis.call('HGET', ARGV[3] .. rec['phone'], 's')
      elseif rec['phone'] ~= ARGV[5] then
        return 'recheck'  -- the number changed since the caller read its keyword consent
      end
      if s == 'opted_out' then return 'cancelled:opted_out' end
    end
  end
end
redis.call('HSET', KEYS[1], 's', 'calling', 'l', now + ARGV[2])
return 'ok'
