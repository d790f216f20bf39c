-- track_handback: give a claim back (the follower stopped without finishing the job).
-- KEYS: 1 track ZSET, 2 track owner HASH. ARGV: 1 job id, 2 this process's id, 3 due in ms.
-- Returns 1 if the claim was this process's and is now due again, 0 otherwise (nothing changed).
-- @include now
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[1], 'XX', now_ms + tonumber(ARGV[3]), ARGV[1])
return 1
