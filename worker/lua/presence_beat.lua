-- presence_beat: publish one process's heartbeat and effective limits; sweep dead entries.
-- KEYS[1] = P:procs        (ZSET process id -> last beat, ms of Redis TIME)
-- KEYS[2] = P:proc:{id}    (STRING, the process's JSON info; expires after the TTL)
-- ARGV[1] = process id
-- ARGV[2] = info JSON
-- ARGV[3] = TTL in ms (no beat for this long = dead)
-- return  = {now_ms, removed}: the beat time and how many dead processes were swept
-- @include now
local ttl_ms = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now_ms, ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ttl_ms)
local removed = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now_ms - ttl_ms))
return {now_ms, removed}
