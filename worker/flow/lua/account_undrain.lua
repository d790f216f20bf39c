-- account_undrain: make a drained fal account usable again (an operator fixed its key). Waiting
-- jobs are admitted into its room by the next admission (the housekeeper's sweep dispatches them).
-- KEYS: 1..5 as slots_head. ARGV: 1..3 as slots_head; 4 account id.
-- Returns 1 when it was drained, else 0.
-- @include slots_head
local was = not account_usable(ARGV[4])
redis.call('HDEL', fair, 'adrain:' .. ARGV[4], 'adrain_until:' .. ARGV[4])
if was then return 1 end
return 0
