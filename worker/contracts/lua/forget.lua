-- forget: take a job whose record is gone (expired, or lost with Redis data) out of every index
-- that names it, and free what it held; a job whose record exists is left alone (returns 0).
-- KEYS: 1..16 as job_head (record, slots, waiting, wait lists x3, reservations, delayed, blocked,
--       track, track owner, the reservation's budget period keys, the cluster's and its tenant's,
--       the ledger).
-- ARGV: 1 job id, 2 options (JSON: capacity, reserved, lease_ms, bprefix).
-- Returns {1, admitted ids...} when the job was forgotten, {0} when its record exists, or
-- {0, 'BUDGET_KEYS:...'} when the reservation's period keys were not passed (nothing changed).
-- @include job_head
if redis.call('EXISTS', job_key) == 1 then return {0} end
local missing = check_reservation_keys(job_id)
if missing then return {0, missing} end
redis.call('ZREM', delayed, job_id)
redis.call('ZREM', blocked, job_id)
redis.call('ZREM', track, job_id)
redis.call('HDEL', track_owner, job_id)
-- nobody can say what a vanished job cost: its reservation is released, not charged
settle_reservation(job_id, -1)
local out = {1}
for _, id in ipairs(release_slot(job_id)) do out[#out + 1] = id end
return out
