-- KEYS: decision, then deferred, data, lease (none on a cluster: ``deferred_add`` added the
-- decision to its shard first). ARGV: decision id, due, outcome, payload, ttl, grace, token.
if redis.call('HGET', KEYS[1], 't') ~= ARGV[7] then return 0 end
redis.call('HSET', KEYS[1], 's', 'deferred', 'o', ARGV[3], 'os', 'deferred', 'l', now + ARGV[6])
redis.call('HDEL', KEYS[1], 'e', 'dl')
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if KEYS[2] then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
  redis.call('ZREM', KEYS[4], ARGV[1])
end
return 1
