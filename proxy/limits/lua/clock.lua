-- Prepended to admit.lua and settle.lua when they are loaded (proxy/limits/redis.py), after
-- `local LEAVES = <n>` from proxy/limits/base.py: the script's time and window horizon.
--
-- ARGV[5]  "" to take the time from the server's TIME (so every gateway agrees), or a unix
--          time in microseconds: a seam for tests only (RedisLimiter's `clock`)

local now_us
if ARGV[5] == "" then
  local t = redis.call("TIME")
  now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now_us = tonumber(ARGV[5])
end
local second = math.floor(now_us / 1000000)
local horizon = second - LEAVES -- buckets at or before this second have left the window
local WINDOW_TTL_MS = (LEAVES + 2) * 1000 -- the newest bucket leaves the window in LEAVES s
