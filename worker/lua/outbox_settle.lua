-- outbox_settle: record one delivery try of a callback.
-- KEYS: 1 outbox ZSET, 2 the entry HASH, 3 failed ZSET, 4 the job's record.
-- ARGV: 1 event id, 2 outcome: 'delivered' | 'retry' | 'failed', 3 next due ms (retry),
--       4 what happened (for the record and the entry), 5 failed-entry retention ms.
-- Returns 1, or 0 when the entry is gone (another process settled it).
-- @include now
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
local status = ARGV[4]
if ARGV[2] == 'delivered' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2])
  status = 'delivered'
elseif ARGV[2] == 'retry' then
  redis.call('HINCRBY', KEYS[2], 'attempts', 1)
  redis.call('HSET', KEYS[2], 'last_error', ARGV[4], 'last_try_ms', now_ms)
  redis.call('ZADD', KEYS[1], tonumber(ARGV[3]), ARGV[1])
  status = 'retrying:' .. ARGV[4]
else
  redis.call('HINCRBY', KEYS[2], 'attempts', 1)
  redis.call('HSET', KEYS[2], 'last_error', ARGV[4], 'last_try_ms', now_ms, 'failed_at_ms', now_ms)
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('ZADD', KEYS[3], now_ms, ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  status = 'failed:' .. ARGV[4]
end
-- the record hears of it only while it is the same life's record
if redis.call('HGET', KEYS[4], 'event_id') == ARGV[1] then
  redis.call('HSET', KEYS[4], 'callback_status', status)
end
return 1
