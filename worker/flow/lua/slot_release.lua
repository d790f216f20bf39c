-- slot_release: give back a job's slot (no-op if it holds none; also unqueues it), admit waiters.
-- KEYS, ARGV 1..3: as slots_head. ARGV 4: job id. Returns the admitted ids.
-- @include slots_head
return release_slot(ARGV[4])
