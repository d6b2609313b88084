-- KEYS: contact hash. ARGV: expected record, new record (the offset stays), its number.
if redis.call('HGET', KEYS[1], 'v') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[2])
local o = redis.call('HGET', KEYS[1], 'o')
if o then
  redis.call('HSET', KEYS[1], 'p', o .. '|' .. ARGV[3])
else
  redis.call('HDEL', KEYS[1], 'p')
end
return 1
