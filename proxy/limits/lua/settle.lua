-- Replace reservations by the real usage, then report the totals: the rules of
-- proxy/limits/base.py. One call settles a batch (those one gateway process made in one
-- event-loop turn) in order, each one atomic step. With a delta of 0 it only reports
-- (RedisLimiter.usage).
--
-- ARGV[1]  the time override, see clock.lua (prepended: now_us, second, horizon, LEAVES)
-- Then 5 values per settlement, with its keys in KEYS, in the same order:
--   nkeys           how many keys it has: 1, plus 2 with a quota, plus 1 with an id (so 3 or
--                   4 mean a quota, and an even count an id)
--   delta           used - reserved
--   reserved        the bucket (unix second) the reservation was charged in
--   has_rate        1 when the limit has a rate, else 0
--   quota_ttl       ms until the current period counter may expire (its period end + 1 day)
-- Its KEYS: the key's rate window (a hash, field = unix second, value = tokens charged then);
-- with a quota, the reservation's quota period counter and the current one (often the same
-- key); last, with an id, the settlement's "once" key: a settlement whose once key exists
-- has been applied (its first call timed out, but the server ran it) and only reports. The
-- key lives ONCE_TTL_MS, longer than a replay waits for a server that answers again.
--
-- Returns one {used, quota_used} per settlement: the window total and the current period's
-- total after it.

local function settle(rate_key, reserved_key, current_key, once_key, delta, reserved_second,
                      has_rate, quota_ttl)
  local has_quota = current_key ~= nil
  if once_key and not redis.call("SET", once_key, "1", "NX", "PX", ONCE_TTL_MS) then
    delta = 0  -- applied before: report only
  end
  if delta < 0 then
    -- Give back to where the reservation was charged, never below 0; a bucket that has left
    -- the window or a period counter that has expired is left alone.
    if has_rate and reserved_second > horizon then
      local have = tonumber(redis.call("HGET", rate_key, reserved_second) or "0")
      local back = math.min(have, -delta)
      if back > 0 then
        redis.call("HINCRBY", rate_key, reserved_second, -back)
      end
    end
    if has_quota then
      local have = tonumber(redis.call("GET", reserved_key) or "0")
      local back = math.min(have, -delta)
      if back > 0 then
        redis.call("DECRBY", reserved_key, back)
      end
    end
  elseif delta > 0 then
    -- Usage beyond the reservation happened now.
    if has_rate then
      redis.call("HINCRBY", rate_key, second, delta)
      redis.call("PEXPIRE", rate_key, WINDOW_TTL_MS)
    end
    if has_quota then
      redis.call("INCRBY", current_key, delta)
      redis.call("PEXPIRE", current_key, quota_ttl)
    end
  end

  local used = 0
  if has_rate then
    local flat = redis.call("HGETALL", rate_key)
    for i = 1, #flat, 2 do
      if tonumber(flat[i]) > horizon then
        used = used + tonumber(flat[i + 1])
      end
    end
  end
  local quota_used = 0
  if has_quota then
    quota_used = tonumber(redis.call("GET", current_key) or "0")
  end
  return { used, quota_used }
end

local out, k = {}, 1
for a = 2, #ARGV, 5 do
  local nkeys = tonumber(ARGV[a])
  local reserved_key, current_key, once_key
  if nkeys >= 3 then
    reserved_key, current_key = KEYS[k + 1], KEYS[k + 2]
  end
  if nkeys % 2 == 0 then
    once_key = KEYS[k + nkeys - 1]
  end
  out[#out + 1] = settle(KEYS[k], reserved_key, current_key, once_key, tonumber(ARGV[a + 1]),
    tonumber(ARGV[a + 2]), ARGV[a + 3] == "1", tonumber(ARGV[a + 4]))
  k = k + nkeys
end
return out
