-- A circuit breaker's failure, counted across gateway processes (proxy/sharedbreakers.py).
-- Appended to clock.lua, which reads the time (ARGV[5]) into now_us.
--
-- KEYS[1]  the backend's failures: a sorted set, member = a unique id, score = ms
-- KEYS[2]  the backend's trip: a string whose PTTL is what is left of the trip
-- ARGV[1]  count: the failures within the interval that trip the breaker
-- ARGV[2]  the interval in ms
-- ARGV[3]  the trip's duration in ms
-- ARGV[4]  this failure's unique id
--
-- Returns the ms left of the trip (0: not tripped).

local now_ms = math.floor(now_us / 1000)
local count = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local trip = tonumber(ARGV[3])

local left = redis.call("PTTL", KEYS[2])
if left > 0 then
  return left
end
redis.call("ZADD", KEYS[1], now_ms, ARGV[4])
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", now_ms - interval)
redis.call("PEXPIRE", KEYS[1], interval)
if redis.call("ZCARD", KEYS[1]) < count then
  return 0
end
redis.call("DEL", KEYS[1])
redis.call("SET", KEYS[2], "1", "PX", trip)
return trip
