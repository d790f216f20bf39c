-- slot_withdraw: take a job out of the wait queues. KEYS, ARGV 1..3: as slots_head; ARGV 4 job id.
-- Returns 1 if the job was waiting.
-- @include slots_head
return unqueue(ARGV[4])
