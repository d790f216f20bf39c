-- budget_settle: charge the billed amount and drop the reservation, in the reservation's periods.
-- KEYS: 1 reservations HASH, 2 and 3 the day and month budget keys of the job's reservation.
-- ARGV: 1 prefix, 2 job, 3 actual micro (-1 = release, charge nothing).
-- Returns 1 if a reservation was settled, 0 if the job held none, or 'BUDGET_KEYS:<day>|<month>'
-- when KEYS 2 and 3 are not the reservation's (nothing changed; retry with these).
-- @include now
local bprefix, reservations = ARGV[1], KEYS[1]
local bdeclared = {[KEYS[2]] = true, [KEYS[3]] = true}
-- @include budget_lib
local wrong_period = check_reservation_keys(ARGV[2])
if wrong_period then return wrong_period end
return settle_reservation(ARGV[2], tonumber(ARGV[3]))[1]
