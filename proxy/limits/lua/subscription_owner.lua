-- The stored subscription holding a key (proxy/subscriptions.py).
--
-- KEYS[1]  the records: a hash, id -> JSON record
-- KEYS[2]  the key digests: a hash, hex digest -> id
-- ARGV[1]  the key's SHA-256 digest (hex)
--
-- Returns {id, record}, or nil.

local id = redis.call('HGET', KEYS[2], ARGV[1])
if not id then return false end
local record = redis.call('HGET', KEYS[1], id)
if not record then return false end
return {id, record}
