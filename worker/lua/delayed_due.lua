-- delayed_due: take deferred jobs whose time has come; their entries stay, leased ahead, until the
-- job leaves DEFERRED, so a lost dispatch message is dispatched again.
-- KEYS: 1 delayed ZSET. ARGV: 1 limit, 2 lease ms. Returns the due job ids.
-- @include now
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), id) end
return due
