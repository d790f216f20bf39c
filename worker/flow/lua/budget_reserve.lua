-- budget_reserve: reserve a job's estimate in today's and this month's budget, or refuse.
-- KEYS: 1 reservations HASH, 2 the job's record (any key of the prefix when ARGV 9 is '0'),
--       3 today's day and 4 this month's budget keys.
-- ARGV: 1 prefix, 2 job, 3 estimate micro, 4 day cap, 5 month cap, 6 day ttl s, 7 month ttl s,
--       8 the attempt that asks ('' = any attempt), 9 '1' to fence on the record, '0' for none.
-- Returns {1, ''} reserved (or already held), {0, 'day'|'month'} refused by a cap,
--         {-1, state} refused by the fence: the job left the pre-submit states or another attempt owns it,
--         {-2, 'BUDGET_KEYS:<day>|<month>'}: KEYS 3 and 4 are not today's (retry with these).
-- @include now
local bprefix, reservations = ARGV[1], KEYS[1]
local bdeclared = {[KEYS[3]] = true, [KEYS[4]] = true}
-- @include budget_lib
local wrong_period = check_today_keys()
if wrong_period then return {-2, wrong_period} end
local job, est = ARGV[2], tonumber(ARGV[3])
if ARGV[9] == '1' then
  local state = redis.call('HGET', KEYS[2], 'state') or ''
  local owner = redis.call('HGET', KEYS[2], 'attempt') or ''
  local pre = state == 'QUEUED' or state == 'WAITING' or state == 'BLOCKED' or state == 'DEFERRED'
  if not pre or (ARGV[8] ~= '' and owner ~= ARGV[8]) then return {-1, state} end
end
if redis.call('HEXISTS', reservations, job) == 1 then return {1, ''} end
local dk, mk = day_key(today), month_key(this_month)
if bfield(dk, 'spent') + bfield(dk, 'reserved') + est > tonumber(ARGV[4]) then return {0, 'day'} end
if bfield(mk, 'spent') + bfield(mk, 'reserved') + est > tonumber(ARGV[5]) then return {0, 'month'} end
redis.call('HINCRBY', dk, 'reserved', est)
redis.call('HINCRBY', mk, 'reserved', est)
redis.call('EXPIRE', dk, ARGV[6])
redis.call('EXPIRE', mk, ARGV[7])
local record = table.concat({ARGV[3], today, this_month, string.format('%.0f', now_ms)}, '|')
redis.call('HSET', reservations, job, record)
return {1, ''}
