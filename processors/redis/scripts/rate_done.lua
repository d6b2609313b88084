-- KEYS[1] the guard's sorted set; ARGV[1] a member: its answer is in, score it "now".
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZADD', KEYS[1], 'XX', 'LT', string.format('%d', now), ARGV[1])
return 0
