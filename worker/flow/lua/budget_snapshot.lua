-- budget_snapshot: spend and reservations of the current UTC day and month.
-- KEYS: 1 reservations HASH, 2 today's day and 3 this month's budget keys. ARGV: 1 prefix.
-- Returns {day spent, day reserved, month spent, month reserved} in micro-dollars, or
-- {'BUDGET_KEYS:<day>|<month>|'} when KEYS 2 and 3 are not today's (retry with these).
-- @include now
local bprefix, reservations, ledger, fair = ARGV[1], KEYS[1], false, false  -- settles nothing
local bdeclared = {[KEYS[2]] = true, [KEYS[3]] = true}
-- @include budget_lib
local wrong_period = check_today_keys()
if wrong_period then return {wrong_period} end
local dk, mk = day_key(today), month_key(this_month)
return {bfield(dk, 'spent'), bfield(dk, 'reserved'), bfield(mk, 'spent'), bfield(mk, 'reserved')}
