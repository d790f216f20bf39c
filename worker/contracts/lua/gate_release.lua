-- gate_release: end the gate of an attempt whose run died (its process stopped beating), so the
-- job is dispatched again now instead of when the gate would have expired.
-- KEYS: 1 job record, 2 delayed ZSET. ARGV: 1 job id, 2 the attempt whose gate it is.
-- Returns 1 if released (the job is due in `delayed` now), 0 if the job moved on (nothing changed).
-- @include now
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'QUEUED' and state ~= 'WAITING' and state ~= 'BLOCKED' and state ~= 'DEFERRED' then return 0 end
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[2] then return 0 end
if (tonumber(redis.call('HGET', KEYS[1], 'gate_until_ms') or '0') or 0) <= now_ms then return 0 end
redis.call('HSET', KEYS[1], 'gate_until_ms', 0)
redis.call('ZADD', KEYS[2], now_ms, ARGV[1])
return 1
