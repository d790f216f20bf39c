-- slot_acquire: take a slot for a job now if the fair-share rule gives it the next free slot, or
-- queue it (once) in its tenant's line.
-- KEYS: 1..5 as slots_head; 6 the job's record (any key of the prefix when ARGV 7 is '0').
-- ARGV: 1..3 as slots_head; 4 job id, 5 priority index (1 high, 2 normal, 3 low),
--       6 the attempt that asks (the record's `attempt` must equal it; '' = any attempt),
--       7 '1' to fence on the record (it must be pre-submit), '0' for no fence,
--       8 the job's tenant when not fenced (fenced: the record's `tenant` field).
-- Returns {1, 0, account} acquired (the fal account the slot is on), {0, ahead} waiting,
-- {-1, state} refused by the fence (nothing changed).
-- @include slots_head
local job, p = ARGV[4], tonumber(ARGV[5])
local tenant = ARGV[8] or ''
if ARGV[7] == '1' then
  local state = redis.call('HGET', KEYS[6], 'state') or ''
  local owner = redis.call('HGET', KEYS[6], 'attempt') or ''
  local pre = state == 'QUEUED' or state == 'WAITING' or state == 'BLOCKED' or state == 'DEFERRED'
  if not pre or (ARGV[6] ~= '' and owner ~= ARGV[6]) then return {-1, state} end
  tenant = redis.call('HGET', KEYS[6], 'tenant') or ''
end
-- idempotent: same slot, fresh lease; unless a new reservation does not fit its account's budget
-- (accounts_lib account_bind_held): then the slot goes back and the job queues for one that fits
if redis.call('ZSCORE', slots, job) then
  if account_bind_held(job) then
    redis.call('ZADD', slots, now_ms + lease_ms, job)
    return {1, 0, account_of(job)}
  end
  drop_slot(job)
end
-- queue it (once), then take the slot only if the rule picks this very job (nobody is passed over)
enqueue_wait(job, tenant, p)
refresh_capacity()
local entry = choose()
if entry and redis.call('HGET', fair, 'pos:' .. job) == entry then
  take_slot(job, tenant)  -- before unqueue: the tenant is not idle in between
  unqueue(job)
  return {1, 0, account_of(job)}
end
return {0, ahead_of(job)}
