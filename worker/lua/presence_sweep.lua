-- presence_sweep: forget processes whose last beat is older than the TTL.
-- KEYS[1] = P:procs        (ZSET process id -> last beat ms)
-- ARGV[1] = TTL in ms
-- return  = the number of entries removed (their info keys expire on their own)
-- @include now
return redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now_ms - tonumber(ARGV[1])))
