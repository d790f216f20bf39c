-- output_claim: take due output copies: their due time moves ahead by a lease, so a process that
-- dies mid-copy hands them back by itself (worker/output_copy.py then takes each with output_take).
-- KEYS: 1 outputs pending ZSET (event id -> due ms). ARGV: 1 limit, 2 lease ms.
-- Returns the claimed event ids.
-- @include now
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), id) end
return due
