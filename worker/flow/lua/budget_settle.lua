-- budget_settle: charge the billed amount and drop the reservation, in the reservation's periods
-- (the cluster's and its tenant's), appending the charge to the cost ledger.
-- KEYS: 1 reservations HASH, 2 and 3 the day and month budget keys of the job's reservation,
--       4 and 5 the same of its tenant (any key when it has none), 6 the ledger STREAM, 7 the slot
--       pool's fair HASH (the fal accounts' money, accounts_lib: a reservation bound to an account
--       settles there too).
-- ARGV: 1 prefix, 2 job, 3 actual micro (-1 = release, charge nothing), 4 the ledger entry as JSON
--       (attempt, request_id, billed_s, kind).
-- Returns 1 if a reservation was settled, 0 if the job held none, or
-- 'BUDGET_KEYS:<day>|<month>|<tenant>' when the period keys passed are not the reservation's
-- (nothing changed; retry with these).
-- @include now
local bprefix, reservations, ledger, fair = ARGV[1], KEYS[1], KEYS[6], KEYS[7]
local bdeclared = {[KEYS[2]] = true, [KEYS[3]] = true, [KEYS[4]] = true, [KEYS[5]] = true}
-- @include budget_lib
local wrong_period = check_reservation_keys(ARGV[2])
if wrong_period then return wrong_period end
return settle_reservation(ARGV[2], tonumber(ARGV[3]), cjson.decode(ARGV[4] or '{}'))[1]
