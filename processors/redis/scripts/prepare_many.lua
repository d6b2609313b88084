-- KEYS: per decision its state hash and its user's contact hash. ARGV: state ttl, grace, the
-- phone key prefix ('' on a cluster: no keyword consent is read, the caller reads it), then one token per decision. For each decision, in order: ``begin`` (not
-- resuming deferred sends) plus the policy's reads (profile, the keyword consent of its number,
-- cancellation) at the same instant (``begin`` changes neither the profile nor the
-- cancellation, so they are read with its state). One script for a whole batch: the per-call
-- overhead of a script (in Redis and in redis-py) is most of the cost of a decision's few
-- commands. The reply is flat: 11 values per decision. The profile's number is its ``p``
-- field when that was written with the profile at its offset ``o`` (see ``put_contact``), else
-- read from the profile's JSON.
local out = {}
for i = 1, #ARGV - 3 do
  local dkey, ckey = KEYS[2 * i - 1], KEYS[2 * i]
  local c = redis.call('HMGET', dkey, 's', 'c', 'ca')
  local b = begin_from(dkey, c[1], ARGV[3 + i], '0', ARGV[1], ARGV[2], now)
  local cf = redis.call('HMGET', ckey, 'v', 'o', 'p')
  local v, phone = cf[1], nil
  if v then
    local at = cf[3] and cf[2] and string.find(cf[3], '|', 1, true)
    if at and string.sub(cf[3], 1, at - 1) == cf[2] then
      phone = string.sub(cf[3], at + 1)
    else
      local ok, rec = pcall(cjson.decode, v)
      if ok and type(rec) == 'table' and type(rec['phone']) == 'string' then
        phone = rec['phone']
      end
    end
  end
  local p = {false, false, false}
  if phone and ARGV[3] ~= '' then p = redis.call('HMGET', ARGV[3] .. phone, 's', 'at', 'src') end
  local o = 11 * i - 11  -- one flat reply: a table per decision costs Redis more
  out[o + 1], out[o + 2], out[o + 3], out[o + 4], out[o + 5] = b[1], b[2], b[3], b[4], b[5]
  out[o + 6], out[o + 7], out[o + 8], out[o + 9] = v, p[1], p[2], p[3]
  out[o + 10], out[o + 11] = c[2], c[3]
end
return out
