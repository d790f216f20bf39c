-- budget_reserve: reserve a job's estimate in today's and this month's budget, the cluster's and its
-- tenant's at once, or refuse (the first cap that would be exceeded).
-- KEYS: 1 reservations HASH, 2 the job's record (any key of the prefix when ARGV 9 is '0'),
--       3 today's day and 4 this month's budget keys, 5 and 6 the same of the tenant (any key when
--       ARGV 10 is ''), 7 the tenant's limits HASH (daily_budget_micro, monthly_budget_micro;
--       absent = no tenant cap).
-- ARGV: 1 prefix, 2 job, 3 estimate micro, 4 day cap, 5 month cap, 6 day ttl s, 7 month ttl s,
--       8 the attempt that asks ('' = any attempt), 9 '1' to fence on the record, '0' for none,
--       10 tenant ('' = none). Fenced on the record, the record's own `tenant` field decides; the
--       caller's guess only picks the keys, and wrong keys are refused (BUDGET_KEYS) and retried.
-- Returns {1, ''} reserved (or already held), {0, 'day'|'month'|'tenant_day'|'tenant_month'}
--         refused by a cap, {-1, state} refused by the fence: the job left the pre-submit states or
--         another attempt owns it, {-2, 'BUDGET_KEYS:<day>|<month>|<tenant>'}: the period keys
--         passed are not today's (retry with these).
-- @include now
local bprefix, reservations, ledger, fair = ARGV[1], KEYS[1], false, false  -- settles nothing
local bdeclared = {[KEYS[3]] = true, [KEYS[4]] = true, [KEYS[5]] = true, [KEYS[6]] = true}
-- @include budget_lib
local tenant = ARGV[10] or ''
local job, est = ARGV[2], tonumber(ARGV[3])
if ARGV[9] == '1' then
  local state = redis.call('HGET', KEYS[2], 'state') or ''
  local owner = redis.call('HGET', KEYS[2], 'attempt') or ''
  local pre = state == 'QUEUED' or state == 'WAITING' or state == 'BLOCKED' or state == 'DEFERRED'
  if not pre or (ARGV[8] ~= '' and owner ~= ARGV[8]) then return {-1, state} end
  tenant = redis.call('HGET', KEYS[2], 'tenant') or ''
end
local wrong_period = check_today_keys(tenant)
if not wrong_period and tenant ~= '' and KEYS[7] ~= bprefix .. ':tenant:' .. tenant .. ':limits' then
  wrong_period = 'BUDGET_KEYS:' .. today .. '|' .. this_month .. '|' .. tenant
end
if wrong_period then return {-2, wrong_period} end
if redis.call('HEXISTS', reservations, job) == 1 then return {1, ''} end
local dk, mk = day_key(today), month_key(this_month)
if bfield(dk, 'spent') + bfield(dk, 'reserved') + est > tonumber(ARGV[4]) then return {0, 'day'} end
if bfield(mk, 'spent') + bfield(mk, 'reserved') + est > tonumber(ARGV[5]) then return {0, 'month'} end
local touched = {{dk, ARGV[6]}, {mk, ARGV[7]}}
if tenant ~= '' then
  local tdk, tmk = tenant_day_key(tenant, today), tenant_month_key(tenant, this_month)
  local caps = redis.call('HMGET', KEYS[7], 'daily_budget_micro', 'monthly_budget_micro')
  local day_cap, month_cap = tonumber(caps[1]), tonumber(caps[2])
  if day_cap and bfield(tdk, 'spent') + bfield(tdk, 'reserved') + est > day_cap then return {0, 'tenant_day'} end
  if month_cap and bfield(tmk, 'spent') + bfield(tmk, 'reserved') + est > month_cap then
    return {0, 'tenant_month'}
  end
  touched[3] = {tdk, ARGV[6]}
  touched[4] = {tmk, ARGV[7]}
end
for _, kt in ipairs(touched) do
  redis.call('HINCRBY', kt[1], 'reserved', est)
  redis.call('EXPIRE', kt[1], kt[2])
end
local record = table.concat({ARGV[3], today, this_month, string.format('%.0f', now_ms), tenant}, '|')
redis.call('HSET', reservations, job, record)
return {1, ''}
