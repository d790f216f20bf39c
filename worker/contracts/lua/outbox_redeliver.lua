-- outbox_redeliver: put a given-up callback back in the outbox, due now, with a fresh retry window.
-- KEYS: 1 outbox ZSET, 2 the entry HASH, 3 failed ZSET. ARGV: 1 event id.
-- Returns 1, or 0 when the entry is unknown or expired.
-- @include now
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 0
end
redis.call('PERSIST', KEYS[2])
redis.call('HSET', KEYS[2], 'created_at_ms', now_ms, 'attempts', 0)
redis.call('HDEL', KEYS[2], 'failed_at_ms')
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[1], now_ms, ARGV[1])
return 1
