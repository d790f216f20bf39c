-- slots_head: binds the slot pool's KEYS and ARGV for the scripts of worker/flow/slots.py.
-- KEYS: 1 slots ZSET, 2 waiting SET, 3 wait_q ZSET, 4 fair HASH, 5 tenant params HASH (see slots_lib).
-- ARGV: 1 the fal accounts 'id:cap,...' (or a bare capacity: one account; see accounts_lib),
--       2 reserved_high, 3 lease_ms; script-specific arguments follow.
-- @include now
local slots, waiting = KEYS[1], KEYS[2]
local wait_q, fair, params = KEYS[3], KEYS[4], KEYS[5]
local acct_spec, capacity = ARGV[1], 0  -- capacity: set by refresh_capacity (accounts_lib)
local reserved, lease_ms = tonumber(ARGV[2]), tonumber(ARGV[3])
-- @include slots_lib
