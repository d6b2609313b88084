-- KEYS: decision hashes. ARGV: the status of each one's published outcome.
for i = 1, #KEYS do redis.call('HSET', KEYS[i], 'e', ARGV[i]) end
return #KEYS
