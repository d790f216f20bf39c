-- slot_acquire: take a slot for a job now, or queue it (once) behind the jobs ahead of it.
-- KEYS: 1..5 as slots_head; 6 the job's record (any key of the prefix when ARGV 7 is '0').
-- ARGV: 1..3 as slots_head; 4 job id, 5 priority index (1 high, 2 normal, 3 low),
--       6 the attempt that asks (the record's `attempt` must equal it; '' = any attempt),
--       7 '1' to fence on the record (it must be pre-submit), '0' for no fence.
-- Returns {1, 0} acquired, {0, ahead} waiting, {-1, state} refused by the fence (nothing changed).
-- @include slots_head
local job, p = ARGV[4], tonumber(ARGV[5])
if ARGV[7] == '1' then
  local state = redis.call('HGET', KEYS[6], 'state') or ''
  local owner = redis.call('HGET', KEYS[6], 'attempt') or ''
  local pre = state == 'QUEUED' or state == 'WAITING' or state == 'BLOCKED' or state == 'DEFERRED'
  if not pre or (ARGV[6] ~= '' and owner ~= ARGV[6]) then return {-1, state} end
end
if redis.call('ZSCORE', slots, job) then
  redis.call('ZADD', slots, now_ms + lease_ms, job)  -- idempotent: same slot, fresh lease
  return {1, 0}
end
local contended = false
for i = 1, p do
  local head = live_head(i)
  if head and head ~= job then contended = true end
end
if not contended and redis.call('ZCARD', slots) < limit(p) then
  unqueue(job)
  redis.call('ZADD', slots, now_ms + lease_ms, job)
  return {1, 0}
end
if redis.call('SISMEMBER', waiting, job) == 1 then
  for i = 1, 3 do
    if redis.call('LPOS', queues[i], job) then return {0, ahead_of(job, i)} end
  end
end
local ahead = ahead_of(job, p)
redis.call('RPUSH', queues[p], job)
redis.call('SADD', waiting, job)
return {0, ahead}
