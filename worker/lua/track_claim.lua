-- track_claim: a tracker claims due jobs: their due time moves ahead by the claim TTL (a lease) and
-- the claim is recorded as this process's, so a tracker that lost it can find out.
-- KEYS: 1 track ZSET (job -> due ms), 2 track owner HASH (job -> process id).
-- ARGV: 1 limit, 2 claim ttl ms, 3 this process's id.
-- Returns the claimed job ids.
-- @include now
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(due) do
  redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), id)
  redis.call('HSET', KEYS[2], id, ARGV[3])
end
return due
