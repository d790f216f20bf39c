-- track_takeover: make the claims of a dead process due now, so a live tracker takes them at once.
-- KEYS: 1 track ZSET, 2 track owner HASH.
-- ARGV: pairs of (job id, the dead owner's process id). A claim that changed hands meanwhile is
-- left alone (the fence). Returns how many claims were released.
-- @include now
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[2], ARGV[i])
    redis.call('ZADD', KEYS[1], 'XX', now_ms, ARGV[i])
    n = n + 1
  end
end
return n
