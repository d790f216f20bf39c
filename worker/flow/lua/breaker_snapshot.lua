-- breaker_snapshot: read-only view of the breaker.
-- KEYS: 1 the breaker HASH (see breaker_head).
-- ARGV: 1..4 as breaker_head. Returns {state, open_until, trips, calls, failures}.
-- @include breaker_head
local shown = state
if state == 'open' and now_ms >= open_until then shown = 'half_open' end
local calls, failures = window()
return {shown, fmt(open_until), num('trips', 0), calls, failures}
