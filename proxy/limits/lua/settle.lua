-- Replace a reservation by the real usage, then report the totals: one atomic step, the rules
-- of proxy/limits/base.py. With a delta of 0 it only reports (RedisLimiter.usage).
--
-- KEYS[1]  the key's rate window: a hash, field = unix second, value = tokens charged then
-- KEYS[2]  the reservation's quota period counter   } only when the limit has a quota;
-- KEYS[3]  the current quota period counter         } often the same key
-- ARGV[1]  delta: used - reserved
-- ARGV[2]  the bucket (unix second) the reservation was charged in
-- ARGV[3]  1 when the limit has a rate, else 0
-- ARGV[4]  ms until the current period counter may expire (its period end + 1 day)
-- ARGV[5]  the time override, see clock.lua (prepended: now_us, second, horizon, LEAVES)
--
-- Returns {used, quota_used}: the window total and the current period's total after.

local delta = tonumber(ARGV[1])
local reserved_second = tonumber(ARGV[2])
local has_rate = ARGV[3] == "1"
local quota_ttl = tonumber(ARGV[4])
local has_quota = #KEYS == 3

if delta < 0 then
  -- Give back to where the reservation was charged, never below 0; a bucket that has left
  -- the window or a period counter that has expired is left alone.
  if has_rate and reserved_second > horizon then
    local have = tonumber(redis.call("HGET", KEYS[1], reserved_second) or "0")
    local back = math.min(have, -delta)
    if back > 0 then
      redis.call("HINCRBY", KEYS[1], reserved_second, -back)
    end
  end
  if has_quota then
    local have = tonumber(redis.call("GET", KEYS[2]) or "0")
    local back = math.min(have, -delta)
    if back > 0 then
      redis.call("DECRBY", KEYS[2], back)
    end
  end
elseif delta > 0 then
  -- Usage beyond the reservation happened now.
  if has_rate then
    redis.call("HINCRBY", KEYS[1], second, delta)
    redis.call("PEXPIRE", KEYS[1], WINDOW_TTL_MS)
  end
  if has_quota then
    redis.call("INCRBY", KEYS[3], delta)
    redis.call("PEXPIRE", KEYS[3], quota_ttl)
  end
end

local used = 0
if has_rate then
  local flat = redis.call("HGETALL", KEYS[1])
  for i = 1, #flat, 2 do
    if tonumber(flat[i]) > horizon then
      used = used + tonumber(flat[i + 1])
    end
  end
end
local quota_used = 0
if has_quota then
  quota_used = tonumber(redis.call("GET", KEYS[3]) or "0")
end
return { used, quota_used }
