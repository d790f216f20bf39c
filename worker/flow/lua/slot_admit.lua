-- slot_admit: admit waiting jobs into free slots. KEYS, ARGV: as slots_head. Returns admitted ids.
-- @include slots_head
return admit_all()
