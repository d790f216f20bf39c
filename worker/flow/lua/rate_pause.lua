-- rate_pause: stop every worker's submits until now + pause (never shortening a longer pause);
-- after it the bucket restarts empty and the first submit is a lone probe.
-- KEYS: 1 pause_until STRING (ms), 2 gcra STRING (us), 3 probe STRING.
-- ARGV: 1 pause ms, 2 tolerance_us.
-- Returns the pause deadline (ms, Redis time).
-- @include now
local until_ms = now_ms + tonumber(ARGV[1])
local existing = tonumber(redis.call('GET', KEYS[1]))
if existing and existing > until_ms then until_ms = existing end
redis.call('SET', KEYS[1], string.format('%.0f', until_ms), 'PXAT', string.format('%.0f', until_ms))
-- empty bucket at the deadline: TAT = deadline + tolerance allows exactly one token then, and
-- later ones one interval apart (no burst straight into a fresh pushback)
local floor_us = until_ms * 1000 + tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[2])) or 0
if tat < floor_us then
  redis.call('SET', KEYS[2], string.format('%.0f', floor_us), 'PX', math.ceil((floor_us - now_us) / 1000) + 1)
end
-- the probe mark outlives the pause by a day at most (an idle cluster's next submit is the probe)
redis.call('SET', KEYS[3], 'due', 'PXAT', string.format('%.0f', until_ms + 86400000))
return until_ms
