-- rate_acquire: take one submit token (GCRA), honouring a pushback pause and the probe after it.
-- KEYS: 1 gcra STRING (theoretical arrival time, us), 2 pause_until STRING (ms),
--       3 probe STRING ('due' after a pause | 'inflight:<us>' while the probe is out).
-- ARGV: 1 interval_us, 2 tolerance_us, 3 probe spacing ms (how long the probe holds the others at most).
-- Returns {allowed 0|1, retry_after_ms, reason 'ok'|'rate'|'paused', now_us, probe 0|1}.
-- @include now
local now_s = string.format('%.0f', now_us)
local pause = tonumber(redis.call('GET', KEYS[2]))
if pause and pause > now_ms then
  return {0, pause - now_ms, 'paused', now_s, 0}
end
local probe = redis.call('GET', KEYS[3])
if probe and string.sub(probe, 1, 9) == 'inflight:' then
  -- the first submit after a pause goes alone: the others wait for its answer (or the spacing)
  local left = redis.call('PTTL', KEYS[3])
  if left < 1 then left = 1 end
  return {0, left, 'paused', now_s, 0}
end
local interval, tolerance = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now_us
if tat < now_us then tat = now_us end
if tat - now_us > tolerance then
  return {0, math.ceil((tat - now_us - tolerance) / 1000), 'rate', now_s, 0}
end
local new_tat = tat + interval
-- once TAT is in the past the key means nothing, so let it expire then
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now_us) / 1000) + 1)
if probe then
  redis.call('SET', KEYS[3], 'inflight:' .. now_s, 'PX', tonumber(ARGV[3]))
  return {1, 0, 'ok', now_s, 1}
end
return {1, 0, 'ok', now_s, 0}
