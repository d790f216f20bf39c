-- gate: a submit task run takes the job's gate, as a new attempt, before any flow-control step.
-- KEYS: 1 job record, 2 delayed ZSET, 3 queued ZSET (left once the first run starts).
-- ARGV: 1 job id, 2 gate_ttl_ms (how long the run may take before another may start a new attempt),
--       3 the process id of the run (a dead process's gate is released early by the housekeeper).
-- Returns {1, attempt}: this run owns the job as `attempt` (a new, never-reused id);
--         {2, attempt}: another run's gate is live (a duplicate delivery): touch nothing;
--         {0, state}:   the job is not in a pre-submit state ('' = no record).
-- @include now
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0, ''} end
if state ~= 'QUEUED' and state ~= 'WAITING' and state ~= 'BLOCKED' and state ~= 'DEFERRED' then
  return {0, state}
end
local until_ms = tonumber(redis.call('HGET', KEYS[1], 'gate_until_ms') or '0') or 0
if until_ms > now_ms then return {2, redis.call('HGET', KEYS[1], 'attempt') or ''} end
local attempt = tostring(redis.call('HINCRBY', KEYS[1], 'attempt_seq', 1))
redis.call('ZREM', KEYS[3], ARGV[1])
local ttl = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'attempt', attempt, 'gate_until_ms', now_ms + ttl, 'gate_process', ARGV[3])
-- a safety entry in `delayed`, due just after the gate: every way out of the gate (park, defer,
-- submit, finish) takes the job out of `delayed` or reschedules it, so only a run that died inside
-- the gate leaves it there, and the housekeeper then dispatches the job again (a duplicate message
-- that found this gate busy was acknowledged and dropped, so nothing else would)
redis.call('ZADD', KEYS[2], now_ms + ttl + 1000, ARGV[1])
return {1, attempt}
