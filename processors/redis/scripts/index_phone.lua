-- KEYS: the user's indexed phone. ARGV: user id, phone ('' = none), phone key prefix.
local old = redis.call('GET', KEYS[1])
if old == ARGV[2] then return 0 end
if old then redis.call('SREM', ARGV[3] .. old .. ':users', ARGV[1]) end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('SADD', ARGV[3] .. ARGV[2] .. ':users', ARGV[1])
end
return 1
