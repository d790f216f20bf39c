-- outbox_claim: take due callback deliveries: their due time moves ahead by a lease, so a process
-- that dies mid-delivery hands them back by itself (delivery is at least once; ids de-duplicate).
-- KEYS: 1 outbox ZSET (event id -> due ms). ARGV: 1 limit, 2 lease ms.
-- Returns the claimed event ids.
-- @include now
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), id) end
return due
