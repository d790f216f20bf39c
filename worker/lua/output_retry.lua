-- output_retry: a given-up output copy is due again now, with a fresh copy window
-- (`reframe outputs retry`). Only the copy is retried: nothing here talks to fal, so nothing is
-- paid again.
-- KEYS: 1 outputs failed ZSET, 2 outputs pending ZSET, 3 the entry HASH, 4 the job's record,
--       5 outputs since ZSET (its age counts from the job's finish again: fal's retention does).
-- ARGV: 1 event id. Returns 1, or 0 when it is not a given-up copy (or its entry expired).
-- @include now
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('PERSIST', KEYS[3])
redis.call('HSET', KEYS[3], 'window_start_ms', now_ms, 'retried_at_ms', now_ms)
redis.call('ZADD', KEYS[2], now_ms, ARGV[1])
redis.call('ZADD', KEYS[5], tonumber(redis.call('HGET', KEYS[3], 'created_at_ms') or now_ms), ARGV[1])
if redis.call('HGET', KEYS[4], 'event_id') == ARGV[1] then
  redis.call('HSET', KEYS[4], 'output_copy', 'retrying')
end
return 1
