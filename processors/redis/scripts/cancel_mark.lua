-- A cluster's ``cancel``, the decision's part (the deferred index is in another slot: the caller
-- drops the decision from its shard after this returns 1). KEYS: decision. ARGV: reason,
-- outcome, ttl, grace, the cancel's time, keep ('1': event clock, the send was due before it).
redis.call('HSET', KEYS[1], 'c', ARGV[1], 'ca', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if ARGV[6] == '1' then return 0 end
if redis.call('HGET', KEYS[1], 's') == 'deferred' then
  redis.call('HSET', KEYS[1], 's', 'done', 'o', ARGV[2], 'os', 'cancelled', 'l', now + ARGV[4])
  redis.call('HDEL', KEYS[1], 'e', 'dl')
  return 1
end
return 0
