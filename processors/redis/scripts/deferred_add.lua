-- A cluster's ``defer``, the index's part (before the decision's part, so a decision in state
-- ``deferred`` is always in the index). KEYS: deferred, data, lease of the decision's shard.
-- ARGV: decision id, due, payload ("<due>|<decision JSON>").
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
