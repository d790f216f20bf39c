-- track_beat: renew this process's claims; report the ones it no longer holds.
-- KEYS: 1 track ZSET, 2 track owner HASH. ARGV: 1 claim ttl ms, 2 this process's id, 3.. job ids.
-- Returns the ids whose claim is lost (gone from `track`, or now another process's): their
-- followers must stop, and touch nothing.
-- @include now
local lost = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[2], id) == ARGV[2] and redis.call('ZSCORE', KEYS[1], id) then
    redis.call('ZADD', KEYS[1], 'XX', now_ms + tonumber(ARGV[1]), id)
  else
    lost[#lost + 1] = id
  end
end
return lost
