-- budget_settle: charge the billed amount and drop the reservation, in the reservation's periods.
-- KEYS: 1 reservations HASH. ARGV: 1 prefix, 2 job, 3 actual micro (-1 = release, charge nothing).
-- Returns 1 if a reservation was settled, 0 if the job held none.
-- @include now
local bprefix, reservations = ARGV[1], KEYS[1]
-- @include budget_lib
return settle_reservation(ARGV[2], tonumber(ARGV[3]))[1]
