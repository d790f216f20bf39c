-- now: Redis TIME as integers (the one clock the cluster shares; worker clocks may be skewed).
-- Defines: now_us (microseconds), now_ms (milliseconds). Doubles hold these exactly until ~2255.
local __t = redis.call('TIME')
local now_us = tonumber(__t[1]) * 1000000 + tonumber(__t[2])
local now_ms = math.floor(now_us / 1000)
