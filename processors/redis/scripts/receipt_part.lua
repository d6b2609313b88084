-- KEYS: parts hash. ARGV: message id, part JSON, ttl. A part's final status is sticky.
local final = {delivered=true, expired=true, failed=true, rejected=true, unknown=true}
local old = redis.call('HGET', KEYS[1], ARGV[1])
local keep = false
if old then
  local ok, rec = pcall(cjson.decode, old)
  if ok and type(rec) == 'table' and final[rec['s']] then keep = true end
end
if not keep then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return redis.call('HGETALL', KEYS[1])
