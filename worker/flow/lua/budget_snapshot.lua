-- budget_snapshot: spend and reservations of the current UTC day and month.
-- KEYS: 1 reservations HASH. ARGV: 1 prefix.
-- Returns {day spent, day reserved, month spent, month reserved} in micro-dollars.
-- @include now
local bprefix, reservations = ARGV[1], KEYS[1]
-- @include budget_lib
local dk, mk = day_key(today), month_key(this_month)
return {bfield(dk, 'spent'), bfield(dk, 'reserved'), bfield(mk, 'spent'), bfield(mk, 'reserved')}
