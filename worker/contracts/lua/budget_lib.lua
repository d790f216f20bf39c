-- budget_lib: spend periods, reservations and the cost ledger (included, not run alone).
-- The including script declares first: now_ms (include now), bprefix (the key prefix),
-- reservations (the HASH key job -> "micro|day|month|reserved_at_ms|tenant[|account]": the fal
-- account is appended when a slot binds the reservation, accounts_lib), fair (the slot pool's HASH,
-- where the fal accounts' money lives: accounts_lib), bdeclared (a set of
-- the period keys it was given in KEYS) and ledger (the ledger STREAM key, or false when the
-- script writes no ledger entries). A script touches only declared keys: it first checks with
-- check_today_keys(tenant) / check_reservation_keys(job) and, when a period key it needs was not
-- passed (a date changed between the caller's read and the script), refuses with
-- 'BUDGET_KEYS:<day>|<month>|<tenant>' before writing anything; the caller retries with those keys.
-- Every period exists twice: the cluster's (P:fc:budget:day:<day>) and the job's tenant's
-- (P:fc:budget:tenant:<tenant>:day:<day>); a reservation and a settlement change both at once,
-- so `spent + reserved <= cap` holds for every tenant and globally at every moment.
-- @include civil
local y, m, d = civil(math.floor(now_ms / 86400000))
local today = string.format('%04d-%02d-%02d', y, m, d)
local this_month = string.format('%04d-%02d', y, m)
local function day_key(day) return bprefix .. ':fc:budget:day:' .. day end
local function month_key(month) return bprefix .. ':fc:budget:month:' .. month end
local function tenant_day_key(t, day) return bprefix .. ':fc:budget:tenant:' .. t .. ':day:' .. day end
local function tenant_month_key(t, month) return bprefix .. ':fc:budget:tenant:' .. t .. ':month:' .. month end
local function bfield(k, f) return tonumber(redis.call('HGET', k, f)) or 0 end
-- the period keys money of `tenant` ('' = none: records from before tenants) moves in
local function period_keys(day, month, tenant)
  local keys = {day_key(day), month_key(month)}
  if tenant ~= '' then
    keys[3] = tenant_day_key(tenant, day)
    keys[4] = tenant_month_key(tenant, month)
  end
  return keys
end
-- micro, day, month, tenant ('' = none) and fal account ('' = none bound) of a reservation (5 or 6 fields)
local function parse_reservation(rec)
  local f = {}
  for part in (rec .. '|'):gmatch('([^|]*)|') do f[#f + 1] = part end
  return tonumber(f[1]), f[2], f[3], f[5] or '', f[6] or ''
end
-- add `micro` to fal account `acct`'s spent of `period` ('d' | 'm') `which`; the account keeps only
-- its latest period's field (accounts_lib): an older period's settlement changes nothing it checks
local function account_spend(acct, period, which, micro)
  local ptr = 'ab' .. period .. ':' .. acct
  local cur = redis.call('HGET', fair, ptr)
  if cur and which < cur then return end
  if cur ~= which then
    if cur then redis.call('HDEL', fair, 'abs:' .. acct .. ':' .. period .. ':' .. cur) end
    redis.call('HSET', fair, ptr, which)
  end
  local field = 'abs:' .. acct .. ':' .. period .. ':' .. which
  if redis.call('HINCRBY', fair, field, micro) < 0 then redis.call('HSET', fair, field, 0) end  -- a correction
end
-- take a reservation back out of a period; never below zero (a period key may have expired)
local function unreserve(k, est)
  if est == 0 then return end  -- Lua would send -0, which HINCRBY refuses
  if redis.call('HINCRBY', k, 'reserved', -est) < 0 then redis.call('HSET', k, 'reserved', 0) end
end
-- nil when every key of the periods is declared, else the refusal naming them
local function check_periods(day, month, tenant)
  for _, k in ipairs(period_keys(day, month, tenant)) do
    if not bdeclared[k] then return 'BUDGET_KEYS:' .. day .. '|' .. month .. '|' .. tenant end
  end
  return nil
end
-- nil when today's period keys (the cluster's and `tenant`'s) are declared, else the refusal
local function check_today_keys(tenant)
  return check_periods(today, this_month, tenant or '')
end
-- nil when the periods of `job`'s reservation (if any) are declared, else the refusal naming them
local function check_reservation_keys(job)
  local rec = redis.call('HGET', reservations, job)
  if not rec then return nil end
  local _, day, month, tenant = parse_reservation(rec)
  return check_periods(day, month, tenant)
end
-- one entry of the cost ledger: `micro` charged to `tenant` for `job` (entry: attempt, request_id,
-- billed_s, kind = settled | estimate | correction); the stream is never trimmed by length
local function append_ledger(job, tenant, micro, entry)
  if not ledger or micro == 0 then return end
  redis.call('XADD', ledger, '*', 'job_id', job, 'attempt', entry.attempt or '', 'tenant', tenant,
    'request_id', entry.request_id or '', 'billed_s', entry.billed_s or '',
    'micro', string.format('%d', micro), 'kind', entry.kind or 'settled', 'at_ms', now_ms)
end
-- drop `job`'s reservation, charging `actual` micro-dollars (actual < 0: charge nothing) to the
-- cluster's and the tenant's periods and to its fal account (if bound), and append the charge to the ledger (`entry` as above).
-- Returns {1, est} when there was a reservation, {0, 0} otherwise (a second settle is a no-op).
local function settle_reservation(job, actual, entry)
  local rec = redis.call('HGET', reservations, job)
  if not rec then return {0, 0} end
  local est, day, month, tenant, acct = parse_reservation(rec)
  for _, k in ipairs(period_keys(day, month, tenant)) do
    unreserve(k, est)
    if actual > 0 then redis.call('HINCRBY', k, 'spent', actual) end
  end
  if acct ~= '' then
    -- the fal account the reservation is bound to moves its money with the cluster's
    if est > 0 and redis.call('HINCRBY', fair, 'abr:' .. acct, -est) <= 0 then
      redis.call('HDEL', fair, 'abr:' .. acct)
    end
    if actual > 0 then
      account_spend(acct, 'd', day, actual)
      account_spend(acct, 'm', month, actual)
    end
  end
  redis.call('HDEL', reservations, job)
  if actual > 0 then append_ledger(job, tenant, actual, entry or {}) end
  return {1, est}
end
