-- KEYS: deferred, data, lease of one shard. ARGV: ids of decisions that are done (cancelled or
-- finished): each leaves the index, claimed or not.
for i = 1, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('ZREM', KEYS[3], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
end
return #ARGV
