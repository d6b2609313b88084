-- The reservation (``PolicyStore.begin``) as a Lua function, shared by ``begin.lua`` and the batch
-- script. An attempt asking again with its own token (a batch cut short, see ``settle_many.lua``) is
-- not "busy" with itself.
local function begin_from(key, s, token, resume, ttl, grace, now)
  if (not s) or s == 'reserved' or (s == 'deferred' and resume == '1') then
    redis.call('HSET', key, 's', 'reserved', 't', token)
    redis.call('PEXPIRE', key, ttl)
    return {s or 'new', false, 0, 0, false}
  end
  local f = redis.call('HMGET', key, 'o', 'os', 'e', 'l', 'dl', 't')
  local emitted = f[2] and f[3] == f[2]
  local lease = tonumber(f[4] or '0')
  if s == 'calling' or not emitted then
    if lease > now and f[6] ~= token then return {'busy', false, 0, lease - now, false} end
    -- the previous owner's lease ran out: this attempt takes over (and holds a fresh lease)
    redis.call('HSET', key, 't', token, 'l', now + grace)
  end
  return {s, f[1], emitted and 1 or 0, 0, f[5]}
end
local function begin(key, token, resume, ttl, grace, now)
  return begin_from(key, redis.call('HGET', key, 's'), token, resume, ttl, grace, now)
end
