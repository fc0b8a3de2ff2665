-- Reserve tokens against a counter key's rate window and quota period, or refuse: one atomic
-- step, the rules of proxy/limits/base.py.
--
-- KEYS[1]  the key's rate window: a hash, field = unix second, value = tokens charged then
-- KEYS[2]  the current quota period's counter (only when the limit has a quota)
-- ARGV[1]  tokens to reserve
-- ARGV[2]  tokens-per-minute, or -1 when the limit has no rate
-- ARGV[3]  token-quota, or -1 when the limit has no quota
-- ARGV[4]  ms until the period counter may expire (the caller's period end + 1 day)
-- ARGV[5]  the time override, see clock.lua (prepended: now_us, second, horizon, LEAVES)
--
-- Returns {verdict, second, used, quota_used, retry_after_us}: verdict 1 admitted, 0 refused
-- for the rate, -1 refused for the quota; second is the bucket charged; used and quota_used
-- are the window and period totals after the decision.

local tokens = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local quota = tonumber(ARGV[3])
local quota_ttl = tonumber(ARGV[4])

-- The live buckets, oldest first; the stale ones are deleted on the way.
local used, buckets = 0, {}
if tpm >= 0 then
  local flat = redis.call("HGETALL", KEYS[1])
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
    redis.call("HDEL", KEYS[1], unpack(stale))
  end
end

local quota_used = 0
if quota >= 0 then
  quota_used = tonumber(redis.call("GET", KEYS[2]) or "0")
  if quota_used + tokens > quota then
    return { -1, second, used, quota_used, 0 }
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
  return { 0, second, used, quota_used, retry_us }
end

if tpm >= 0 then
  redis.call("HINCRBY", KEYS[1], second, tokens)
  redis.call("PEXPIRE", KEYS[1], WINDOW_TTL_MS)
end
if quota >= 0 then
  redis.call("INCRBY", KEYS[2], tokens)
  redis.call("PEXPIRE", KEYS[2], quota_ttl)
end
return { 1, second, used + tokens, quota_used + tokens, 0 }
