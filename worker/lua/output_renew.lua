-- output_renew: the copies this process is still working on keep their claim: their due time moves
-- to now + lease, but only while they are pending (XX: a copy settled meanwhile is not brought
-- back). A copier that stops renewing (killed, stopped) hands its copies back one lease later.
-- KEYS: 1 outputs pending ZSET. ARGV: 1 lease ms, 2.. event ids.
-- Returns how many were renewed.
-- @include now
local renewed = 0
for i = 2, #ARGV do
  renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', now_ms + tonumber(ARGV[1]), ARGV[i])
end
return renewed
