-- webhook_accept: record one verified fal webhook once and hand it to a worker, in one step.
-- KEYS: 1 the request id's de-duplication STRING (P:webhook:seen:{request id}),
--       2 the delivery HASH (P:webhook:{request id}), 3 the Celery list the message goes to,
--       4 the pending ZSET (request id -> when the housekeeper sends its task again).
-- ARGV: 1 ttl_ms of both keys, 2 raw body, 3 job id, 4 attempt (both from the URL token),
--       5 the `reframe.webhook` task message, 6 received_at_ms (caller's clock, informational),
--       7 lease ms: a task message lost with its worker is sent again after this long, 8 request id.
-- Returns 1 when recorded and enqueued, 0 when this request id was seen before (nothing changed).
-- @include now
if not redis.call('SET', KEYS[1], ARGV[3] .. ':' .. ARGV[4], 'NX', 'PX', ARGV[1]) then return 0 end
redis.call('HSET', KEYS[2], 'body', ARGV[2], 'job_id', ARGV[3], 'attempt', ARGV[4], 'received_at_ms', ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('LPUSH', KEYS[3], ARGV[5])
redis.call('ZADD', KEYS[4], now_ms + tonumber(ARGV[7]), ARGV[8])
return 1
