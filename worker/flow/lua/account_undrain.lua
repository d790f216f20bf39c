-- account_undrain: make a drained fal account usable again (an operator fixed its key) and admit
-- waiting jobs into its room.
-- KEYS: 1..5 as slots_head. ARGV: 1..3 as slots_head; 4 account id. Returns the admitted ids.
-- @include slots_head
redis.call('HDEL', fair, 'adrain:' .. ARGV[4], 'adrain_until:' .. ARGV[4])
return admit_all()
