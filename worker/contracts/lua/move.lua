-- move: one fenced transition of a live job and what it frees or parks, in one atomic step.
-- KEYS, ARGV 1 and the fence options: as job_head. Further options:
--   to          the new state (non-terminal; finish.lua ends jobs)
--   slot, budget, hold_ms, settle_micro: as free_resources in job_head
--   park_at_ms  DEFERRED: when the housekeeper dispatches the job again (the job joins `delayed`)
--   blocked     true: the job joins `blocked` (budget); leaving BLOCKED/DEFERRED drops it from both
--   track_at_ms the job joins `track`, due at this time (owner: track_by, '' = unclaimed)
--   untrack     true: the job leaves `track`
--   set, incr, del: record fields
--   bind_account true: the record's `fal_account` becomes the account of the job's slot (the
--               SUBMITTING intent: the attempt's requests go through that account's key only)
-- Returns {1, now_ms, admitted ids...} or {0, state} when the fence refused (nothing changed).
-- @include job_head
local refused = fence() or budget_keys_missing()
if refused then return {0, refused} end
redis.call('HSET', job_key, 'state', opt.to, 'ts_' .. opt.to, now_ms, 'updated_at_ms', now_ms)
write_fields()
if opt.bind_account then
  local bound = account_of(job_id)
  if bound == '' and accounts[1] then bound = accounts[1].id end  -- a slot from before accounts
  redis.call('HSET', job_key, 'fal_account', bound)
end
if opt.park_at_ms then
  redis.call('ZADD', delayed, tonumber(opt.park_at_ms), job_id)
else
  redis.call('ZREM', delayed, job_id)
end
if opt.blocked then
  redis.call('ZADD', blocked, 'NX', now_ms, job_id)
else
  redis.call('ZREM', blocked, job_id)
end
if opt.track_at_ms then
  redis.call('ZADD', track, tonumber(opt.track_at_ms), job_id)
  if opt.track_by and opt.track_by ~= '' then
    redis.call('HSET', track_owner, job_id, opt.track_by)
  else
    redis.call('HDEL', track_owner, job_id)
  end
elseif opt.untrack then
  redis.call('ZREM', track, job_id)
  redis.call('HDEL', track_owner, job_id)
end
local out = {1, now_ms}
for _, id in ipairs(free_resources()) do out[#out + 1] = id end
return out
