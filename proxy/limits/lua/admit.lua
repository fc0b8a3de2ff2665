-- Reserve tokens against counter keys' rate windows and quota periods, or refuse: the rules of
-- proxy/limits/base.py. One call decides a batch of admissions (those one gateway process
-- made in one event-loop turn) in order, each one atomic step that sees the ones before it.
--
-- ARGV[1]  the time override, see clock.lua (prepended: now_us, second, horizon, LEAVES)
-- Then 6 values per admission, with its 1 or 2 keys in KEYS, in the same order:
--   nkeys           2 when the limit has a quota, else 1
--   tokens          tokens to reserve
--   most            tokens it may reserve where there is room (a lease, proxy/limits/lease.py;
--                   base.grant's rule, GRANT_SHARE prepended); <= tokens for exactly tokens
--   tpm             tokens-per-minute, or -1 when the limit has no rate
--   quota           token-quota, or -1 when the limit has no quota
--   quota_ttl       ms until the period counter may expire (the caller's period end + 1 day)
-- Its KEYS: the key's rate window (a hash, field = unix second, value = tokens charged then),
-- then the current quota period's counter when nkeys is 2.
--
-- Returns one {verdict, second, used, quota_used, retry_after_us, granted, left_us} per
-- admission: verdict 1 admitted, 0 refused for the rate, -1 refused for the quota; second is
-- the bucket charged; used and quota_used are the window and period totals after the
-- decision; granted the tokens reserved; left_us what is left of the bucket's second.

local function admit(rate_key, quota_key, tokens, most, tpm, quota, quota_ttl)
  -- The live buckets, oldest first; the stale ones are deleted on the way.
  local used, buckets = 0, {}
  if tpm >= 0 then
    local flat = redis.call("HGETALL", rate_key)
    local stale = {}
    for i = 1, #flat, 2 do
      local b, n = tonumber(flat[i]), tonumber(flat[i + 1])
      if b > horizon then
        used = used + n
        buckets[#buckets + 1] = { b, n }
      else
        stale[#stale + 1] = flat[i]
      end
    end
    if #stale > 0 then
      redis.call("HDEL", rate_key, unpack(stale))
    end
  end

  local quota_used = 0
  if quota >= 0 then
    quota_used = tonumber(redis.call("GET", quota_key) or "0")
    if quota_used + tokens > quota then
      return { -1, second, used, quota_used, 0, 0, 0 }
    end
  end

  if tpm >= 0 and used + tokens > tpm then
    -- Mirrors base.rate_retry_after: more than the limit never fits (60 s); otherwise wait
    -- until the oldest buckets holding the excess have left, a bucket b at b + LEAVES.
    local retry_us = 60000000
    if tokens <= tpm then
      table.sort(buckets, function(x, y) return x[1] < y[1] end)
      local excess, freed = used + tokens - tpm, 0
      for _, bucket in ipairs(buckets) do
        freed = freed + bucket[2]
        if freed >= excess then
          retry_us = math.max(0, (bucket[1] + LEAVES) * 1000000 - now_us)
          break
        end
      end
    end
    return { 0, second, used, quota_used, retry_us, 0, 0 }
  end

  if most > tokens then
    -- Mirrors base.grant: the extra takes at most 1/GRANT_SHARE of the room left after tokens.
    local room = nil -- nil: neither the rate nor the quota limits it
    if tpm >= 0 then
      room = tpm - used
    end
    if quota >= 0 and (room == nil or quota - quota_used < room) then
      room = quota - quota_used
    end
    if room == nil then
      tokens = most
    else
      local extra = math.min(most - tokens, math.floor((room - tokens) / GRANT_SHARE))
      tokens = tokens + math.max(0, extra)
    end
  end

  if tpm >= 0 then
    redis.call("HINCRBY", rate_key, second, tokens)
    redis.call("PEXPIRE", rate_key, WINDOW_TTL_MS)
  end
  if quota >= 0 then
    redis.call("INCRBY", quota_key, tokens)
    redis.call("PEXPIRE", quota_key, quota_ttl)
  end
  return { 1, second, used + tokens, quota_used + tokens, 0, tokens, (second + 1) * 1000000 - now_us }
end

local out, k = {}, 1
for a = 2, #ARGV, 6 do
  local nkeys = tonumber(ARGV[a])
  local quota_key
  if nkeys == 2 then
    quota_key = KEYS[k + 1]
  end
  out[#out + 1] = admit(KEYS[k], quota_key, tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]),
    tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]))
  k = k + nkeys
end
return out
