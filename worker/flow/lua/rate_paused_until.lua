-- rate_paused_until: the pushback pause deadline if one is in force.
-- KEYS: 1 pause_until STRING (ms). ARGV: none.
-- Returns the deadline (ms, Redis time) if still in the future, else -1.
-- @include now
local existing = tonumber(redis.call('GET', KEYS[1]))
if existing and existing > now_ms then return existing end
return -1
