-- KEYS: lease, data (none on a cluster), then per item: a Final's decision hash, or a
-- CapCheck's global sends, campaign sends and decision hash. ARGV: most passes, state ttl, grace,
-- '1' when the keys begin with lease and data, then per item either
-- 'f', decision id, outcome, status, token, dead-lettered (1/0)            (``finish``)
-- 'c', decision id, reserve, token, rules, outcome head, outcome tail       (a cap check)
-- 'r', now, sends ttl, trim_before, rule count, then per rule: is_global (1/0), exclusive
-- lower bound (now - per), max, the outcome's ``"rule":<key>`` JSON member
-- A 'r' item declares the rules of the cap checks after it (``rules``: its ARGV index), once
-- per batch, campaign and time. A cap check is ``check_caps.lua`` and, when a rule is violated,
-- ``finish`` with ``head .. member .. tail``, that rule's outcome (a decision suppressed by caps
-- in one step). Items run in order, each exactly as on its own; the script stops after the
-- item whose check is the ``most passes``-th to pass with a reservation (a send: the shell has
-- room for that many), so the rest of the batch is left as it was.
-- Returns {violated rule + 1 or 0, recorded} per 'f' or 'c' item it ran.
-- ``finish`` skips the deferred-claim cleanup when no claim exists (nothing else in the script
-- adds one; on a cluster the caller drops its own claims).
local lease, data, claims, k = nil, nil, false, 1
if ARGV[4] == '1' then
  lease, data, k = KEYS[1], KEYS[2], 3
  claims = redis.call('EXISTS', lease) == 1
end
local function finish(key, did, outcome, status, token, dl, ttl, grace, now)
  local f = redis.call('HMGET', key, 't', 'e', 'dl')
  if f[1] ~= token then return 0 end
  redis.call('HSET', key, 's', 'done', 'o', outcome, 'os', status, 'l', now + grace)
  if dl == '1' then
    redis.call('HSET', key, 'dl', '1')
    if f[2] then redis.call('HDEL', key, 'e') end
  elseif f[2] or f[3] then
    redis.call('HDEL', key, 'e', 'dl')
  end
  redis.call('PEXPIRE', key, ttl)
  if claims and redis.call('ZREM', lease, did) == 1 then redis.call('HDEL', data, did) end
  return 1
end
local most, ttl, grace = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local out, a, passes = {}, 5, 0
local n_out = 0
local bounds, maxes = {}, {}
while a <= #ARGV do
  local kind = ARGV[a]
  if kind == 'f' then
    out[n_out + 1] = 0
    out[n_out + 2] = finish(KEYS[k], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4],
      ARGV[a + 5], ttl, grace, now)
    n_out = n_out + 2
    a, k = a + 6, k + 1
  elseif kind == 'r' then
    local n = tonumber(ARGV[a + 4])
    local b, m = {}, {}
    for i = 0, n - 1 do
      b[i + 1] = '(' .. ARGV[a + 6 + 4 * i]
      m[i + 1] = tonumber(ARGV[a + 7 + 4 * i])
    end
    bounds[a], maxes[a] = b, m
    a = a + 5 + 4 * n
  else
    local gkey, ckey, dkey, did = KEYS[k], KEYS[k + 1], KEYS[k + 2], ARGV[a + 1]
    local reserve, r = ARGV[a + 2], tonumber(ARGV[a + 4])
    local n, b, m = tonumber(ARGV[r + 4]), bounds[r], maxes[r]
    local violated, recorded = 0, 0
    if not redis.call('ZSCORE', gkey, did) then
      for i = 1, n do
        local key = ckey
        if ARGV[r + 1 + 4 * i] == '1' then key = gkey end
        if redis.call('ZCOUNT', key, b[i], '+inf') >= m[i] then
          violated = i
          recorded = finish(dkey, did, ARGV[a + 5] .. ARGV[r + 4 + 4 * i] .. ARGV[a + 6],
            'suppressed', ARGV[a + 3], '0', ttl, grace, now)
          break
        end
      end
      if violated == 0 and reserve == '1' then
        -- sends older than twice the longest window are dropped when one is added (as in
        -- check_caps.lua, which trims first: no rule counts that far back, so no count differs)
        redis.call('ZREMRANGEBYSCORE', gkey, '-inf', '(' .. ARGV[r + 3])
        redis.call('ZREMRANGEBYSCORE', ckey, '-inf', '(' .. ARGV[r + 3])
        redis.call('ZADD', gkey, ARGV[r + 1], did)
        redis.call('ZADD', ckey, ARGV[r + 1], did)
        redis.call('PEXPIRE', gkey, ARGV[r + 2])
        redis.call('PEXPIRE', ckey, ARGV[r + 2])
      end
    end
    out[n_out + 1] = violated
    out[n_out + 2] = recorded
    n_out = n_out + 2
    a, k = a + 7, k + 3
    if violated == 0 and reserve == '1' then
      passes = passes + 1
      if passes >= most then break end
    end
  end
end
return out
