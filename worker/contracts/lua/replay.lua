-- replay: bring a dead-lettered job back to QUEUED as a new life with a new submit message.
-- KEYS: 1 job record, 2 dlq ZSET, 3 the Celery list of the message, 4 the job's idempotency claim
--       (any key when it has none): a live job's record and claim do not expire, 5 queued ZSET.
-- ARGV: 1 message, 2 job id, 3 force ('1' = replay even when the death may have been paid for),
--       4 record retention ms (a live job does not expire; kept for symmetry with finish).
-- Returns {1, now_ms} replayed; {0, reason}: '' no record, 'NOT_DEAD_LETTERED', or
--         'NEEDS_FORCE:<reason>' when fal may hold (and bill) the dead attempt's request.
-- @include now
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0, ''} end
if redis.call('ZSCORE', KEYS[2], ARGV[2]) == false then return {0, 'NOT_DEAD_LETTERED'} end
local reason = redis.call('HGET', KEYS[1], 'dead_letter_reason') or ''
if ARGV[3] ~= '1' and (reason == 'ambiguous_submit' or reason == 'result_unavailable') then
  return {0, 'NEEDS_FORCE:' .. reason}
end
redis.call('PERSIST', KEYS[1])
if (redis.call('HGET', KEYS[1], 'idempotency_key') or '') ~= '' then redis.call('PERSIST', KEYS[4]) end
redis.call('HDEL', KEYS[1], 'fal_request_id', 'fal_status_url', 'fal_response_url', 'fal_cancel_url',
  'error', 'result', 'finished_at_ms', 'dead_letter', 'dead_letter_reason', 'queue_position',
  'cancel_requested', 'cost_actual_micro', 'ts_SUCCEEDED', 'ts_FAILED', 'ts_CANCELLED', 'event_id',
  'gate_until_ms', 'submit_started_at_ms', 'submit_process', 'callback_status')
redis.call('HSET', KEYS[1], 'state', 'QUEUED', 'ts_QUEUED', now_ms, 'updated_at_ms', now_ms, 'attempts', '0')
redis.call('HINCRBY', KEYS[1], 'replays', 1)
if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[1], 'forced_replays', 1) end
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('LPUSH', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[5], now_ms, ARGV[2])
return {1, now_ms}
