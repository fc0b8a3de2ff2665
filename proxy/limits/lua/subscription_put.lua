-- Write one stored subscription (proxy/subscriptions.py): a compare-and-set on its record,
-- with the index of key digests kept in step and a key another subscription holds refused.
--
-- KEYS[1]  the records: a hash, id -> JSON record
-- KEYS[2]  the key digests: a hash, hex digest -> id
-- ARGV[1]  the id
-- ARGV[2]  the record expected there ("" = none)
-- ARGV[3]  the new record ("" = remove it)
-- ARGV[4]  how many digests to drop; then those digests, then the digests to add (hex)
--
-- Returns 1 written, 0 the record was not the one expected, -1 a key is another id's.

local id, expected, record = ARGV[1], ARGV[2], ARGV[3]
if (redis.call('HGET', KEYS[1], id) or '') ~= expected then return 0 end
local dropped = tonumber(ARGV[4])
for i = 5 + dropped, #ARGV do
  local owner = redis.call('HGET', KEYS[2], ARGV[i])
  if owner and owner ~= id then return -1 end
end
for i = 5, 4 + dropped do
  if redis.call('HGET', KEYS[2], ARGV[i]) == id then redis.call('HDEL', KEYS[2], ARGV[i]) end
end
if record == '' then redis.call('HDEL', KEYS[1], id)
else redis.call('HSET', KEYS[1], id, record) end
for i = 5 + dropped, #ARGV do redis.call('HSET', KEYS[2], ARGV[i], id) end
return 1
