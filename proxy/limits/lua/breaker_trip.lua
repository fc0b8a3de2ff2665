-- A circuit breaker tripped in one gateway process: make the trip everyone's
-- (proxy/sharedbreakers.py). A longer trip already there is kept. With ARGV[1] = 0 it only
-- reads.
--
-- KEYS[1]  the backend's trip: a string whose PTTL is what is left of the trip
-- ARGV[1]  the trip's duration in ms
--
-- Returns the ms left of the trip (0: not tripped).

local trip = tonumber(ARGV[1])
local left = redis.call("PTTL", KEYS[1])
if trip > 0 and trip > left then
  redis.call("SET", KEYS[1], "1", "PX", trip)
  return trip
end
return math.max(left, 0)
