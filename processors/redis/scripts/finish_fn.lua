-- Record a final outcome if ``token`` still owns the decision (``PolicyStore.finish``), and
-- drop a deferred claim of it from the index (``lease``, ``data``; nil on a cluster, where the
-- index lives in other slots).
local function finish(key, did, outcome, status, token, dl, ttl, grace, now, lease, data)
  if redis.call('HGET', key, 't') ~= token then return 0 end
  redis.call('HSET', key, 's', 'done', 'o', outcome, 'os', status, 'l', now + grace)
  if dl == '1' then
    redis.call('HSET', key, 'dl', '1')
    redis.call('HDEL', key, 'e')
  else
    redis.call('HDEL', key, 'e', 'dl')
  end
  redis.call('PEXPIRE', key, ttl)
  if lease and redis.call('ZREM', lease, did) == 1 then redis.call('HDEL', data, did) end
  return 1
end
