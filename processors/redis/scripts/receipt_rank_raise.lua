-- KEYS: published-rank key. ARGV: rank, ttl. Returns the previous rank, or -1 (not higher).
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) <= cur then return -1 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return cur
