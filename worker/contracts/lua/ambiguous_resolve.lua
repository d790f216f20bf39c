-- ambiguous_resolve: fal's webhook revealed the request of a submit dead-lettered as ambiguous.
-- The job stays FAILED (its life's event and callback are already out); the request id is
-- recorded, the budget charge is corrected from the estimate to what fal billed, and the slot held
-- for the unseen request is freed (fal is done with it), all fenced by the submitting attempt.
-- KEYS: 1..11 as job_head; 12, 13 the day and month budget keys the dead letter charged, 14, 15 the
--       same of the job's tenant (any key when it has none), 16 the ledger STREAM (the correction
--       is appended). ARGV: 1 job id, 2 options (JSON): the slot options of job_head, and
--   attempt       the attempt named by the webhook's URL token (must own the job)
--   request_id    fal's request id (recorded; a second resolution of the same id is a no-op)
--   charged_micro what the ambiguous settle charged; billed_micro what fal billed
--   set           further record fields
-- Returns {1, now_ms, admitted ids...}, {0, 'DONE'} when already resolved with this request id,
--         or {0, state} when the job is not an unresolved ambiguous dead letter of that attempt.
-- @include job_head
local state = redis.call('HGET', job_key, 'state')
if not state then return {0, ''} end
if state ~= 'FAILED' or (redis.call('HGET', job_key, 'dead_letter_reason') or '') ~= 'ambiguous_submit'
  or redis.call('HGET', job_key, 'attempt') ~= opt.attempt then
  return {0, state}
end
local known = redis.call('HGET', job_key, 'fal_request_id') or ''
if known ~= '' then
  if known == opt.request_id then return {0, 'DONE'} end
  return {0, state}
end
redis.call('HSET', job_key, 'fal_request_id', opt.request_id, 'updated_at_ms', now_ms)
write_fields()
local delta = tonumber(opt.billed_micro) - tonumber(opt.charged_micro)
if delta ~= 0 then
  local tenant = redis.call('HGET', job_key, 'tenant') or ''
  local touched = {KEYS[12], KEYS[13]}
  if tenant ~= '' then touched[3], touched[4] = KEYS[14], KEYS[15] end
  for _, k in ipairs(touched) do
    if redis.call('HINCRBY', k, 'spent', delta) < 0 then redis.call('HSET', k, 'spent', 0) end
  end
  append_ledger(job_id, tenant, delta, {attempt = opt.attempt, request_id = opt.request_id,
    billed_s = opt.billed_s or '', kind = 'correction'})
  -- the fal account the attempt was bound to (its budget, accounts_lib) gets the same correction,
  -- in the periods of KEYS 12 and 13
  local acct = redis.call('HGET', job_key, 'fal_account') or ''
  local day, month = string.match(KEYS[12], ':day:([^:]+)$'), string.match(KEYS[13], ':month:([^:]+)$')
  if acct ~= '' and day and month then
    account_spend(acct, 'd', day, delta)
    account_spend(acct, 'm', month, delta)
  end
end
local out = {1, now_ms}
for _, id in ipairs(release_slot(job_id)) do out[#out + 1] = id end
return out
