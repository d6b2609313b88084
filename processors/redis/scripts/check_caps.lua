-- KEYS: global sends, campaign sends. ARGV: decision id, now, reserve, ttl, trim_before,
-- then per rule: is_global (1/0), exclusive lower bound (now - per), max.
local did = ARGV[1]
if redis.call('ZSCORE', KEYS[1], did) then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[5])
local n = (#ARGV - 5) / 3
for i = 0, n - 1 do
  local key = KEYS[2]
  if ARGV[6 + 3 * i] == '1' then key = KEYS[1] end
  local used = redis.call('ZCOUNT', key, '(' .. ARGV[7 + 3 * i], '+inf')
  if used >= tonumber(ARGV[8 + 3 * i]) then return i + 1 end
end
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[1], ARGV[2], did)
  redis.call('ZADD', KEYS[2], ARGV[2], did)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
return 0
