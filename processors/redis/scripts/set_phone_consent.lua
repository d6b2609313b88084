-- KEYS: phone hash. ARGV: status, at, source. An older keyword never overrides a newer one.
local cur = tonumber(redis.call('HGET', KEYS[1], 'at') or '-1')
if cur > tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 's', ARGV[1], 'at', ARGV[2], 'src', ARGV[3])
return 1
