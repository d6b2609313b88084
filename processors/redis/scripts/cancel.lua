-- ARGV[6]: the cancel's time. Event clock (ARGV[7] = 1): a send deferred to before that time
-- went out before the conversion, so it stays; later checks compare 'ca' with their own time.
redis.call('HSET', KEYS[1], 'c', ARGV[1], 'ca', ARGV[6])
if ARGV[7] == '1' then
  local due = redis.call('ZSCORE', KEYS[2], ARGV[2])
  if due and tonumber(due) < tonumber(ARGV[6]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
    return 0
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if redis.call('HGET', KEYS[1], 's') == 'deferred' and redis.call('ZREM', KEYS[2], ARGV[2]) == 1 then
  redis.call('HDEL', KEYS[3], ARGV[2])
  redis.call('HSET', KEYS[1], 's', 'done', 'o', ARGV[3], 'os', 'cancelled', 'l', now + ARGV[5])
  redis.call('HDEL', KEYS[1], 'e', 'dl')
  return 1
end
return 0
