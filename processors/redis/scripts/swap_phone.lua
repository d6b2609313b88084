-- KEYS: the user's indexed number. ARGV: the number ('' = none). Returns the previous one.
local old = redis.call('GET', KEYS[1])
if ARGV[1] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
return old
