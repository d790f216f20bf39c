-- slot_expired: ids whose lease deadline has passed (they still count against the capacity).
-- KEYS: 1 slots ZSET. ARGV: 1 limit. Returns the ids.
-- @include now
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now_ms, 'LIMIT', 0, tonumber(ARGV[1]))
