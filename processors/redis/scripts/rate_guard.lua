-- KEYS[1] the guard's sorted set (score: the request cannot reach the gateway later; Redis time
-- in us); ARGV: limit, window, lease, poll (all us), a unique member. Returns 0 when admitted,
-- else the us to wait: until the lowest answered request leaves the window, or the poll
-- interval when the lowest is still in flight (its answer may come any time).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now - window))
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], string.format('%d', now + lease), ARGV[5])
  redis.call('PEXPIRE', KEYS[1], math.ceil((window + lease) / 1000) + 1000)
  return {'0'}
end
local lowest = tonumber(redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2])
if lowest > now then
  return {ARGV[4]}
end
return {string.format('%d', math.max(1, lowest + window - now + 1))}
