-- KEYS: claim key. ARGV: lease ms. 'done' is final; a live 'busy' blocks a concurrent duplicate.
local cur = redis.call('GET', KEYS[1])
if cur == 'done' then return 'done' end
if cur then return 'busy' end
redis.call('SET', KEYS[1], 'busy', 'PX', ARGV[1])
return 'claimed'
