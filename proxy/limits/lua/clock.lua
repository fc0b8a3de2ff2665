-- Prepended to the scripts that read the time when they are loaded (proxy/limits/redis.py),
-- after `local LEAVES = <n>` from proxy/limits/base.py and `local CLOCK_ARG = <i>` (which
-- ARGV holds the override): the script's time and window horizon.
--
-- ARGV[CLOCK_ARG]  "" to take the time from the server's TIME (so every gateway agrees), or a unix
--          time in microseconds: a seam for tests only (RedisLimiter's `clock`)

local now_us
if ARGV[CLOCK_ARG] == "" then
  local t = redis.call("TIME")
  now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now_us = tonumber(ARGV[CLOCK_ARG])
end
local second = math.floor(now_us / 1000000)
local horizon = second - LEAVES -- buckets at or before this second have left the window
local WINDOW_TTL_MS = (LEAVES + 2) * 1000 -- the newest bucket leaves the window in LEAVES s
