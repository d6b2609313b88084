-- KEYS: data, lease of one shard. ARGV: pairs of decision id and the payload its claim returned;
-- each claim whose decision is finished (or expired) leaves the index, unless the decision was
-- deferred again meanwhile (another payload).
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('ZREM', KEYS[2], ARGV[i])
    redis.call('HDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
