local f = redis.call('HMGET', KEYS[1], 't', 's')
if f[1] == ARGV[1] and f[2] == 'calling' then
  redis.call('HSET', KEYS[1], 'l', now + ARGV[2])
  return 1
end
return 0
