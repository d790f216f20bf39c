-- slot_renew: extend the leases of jobs that still hold a slot (never creates one).
-- KEYS: 1 slots ZSET. ARGV: 1 ttl_ms, 2.. job ids. Returns how many leases were extended.
-- @include now
local n = 0
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', now_ms + tonumber(ARGV[1]), ARGV[i])
    n = n + 1
  end
end
return n
