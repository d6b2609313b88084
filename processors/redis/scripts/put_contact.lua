-- KEYS: contact hash. ARGV: offset, profile JSON ('' = delete), its phone number ('' = none).
-- ``p`` is "<offset>|<number>": ``prepare_many.lua`` trusts it only while ``o`` is that offset, so
-- a profile written without it (by an older version, which sets ``o`` and ``v`` only) is read
-- from its JSON.
local cur = redis.call('HGET', KEYS[1], 'o')
if cur and tonumber(cur) > tonumber(ARGV[1]) then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
elseif ARGV[3] == '' then
  redis.call('HSET', KEYS[1], 'o', ARGV[1], 'v', ARGV[2])
  redis.call('HDEL', KEYS[1], 'p')
else
  redis.call('HSET', KEYS[1], 'o', ARGV[1], 'v', ARGV[2], 'p', ARGV[1] .. '|' .. ARGV[3])
end
return 1
