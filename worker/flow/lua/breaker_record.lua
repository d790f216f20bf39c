-- breaker_record: count one provider-health outcome; trip, close or extend.
-- KEYS: 1 the breaker HASH (see breaker_head).
-- ARGV: 1..4 as breaker_head; 5 success (1/0), 6 probe (1/0), 7 min calls, 8 failure ratio,
--       9 open base ms, 10 open cap ms, 11 jitter fraction [0,1), 12 jitter ratio, 13 close after,
--       14 floor ms (Retry-After; 0 none).
-- Returns the state after the call.
-- @include breaker_head
local success, probe = ARGV[5] == '1', ARGV[6] == '1'
local min_calls, ratio = tonumber(ARGV[7]), tonumber(ARGV[8])
local base_ms, cap_ms = tonumber(ARGV[9]), tonumber(ARGV[10])
local jitter_u, jitter_ratio = tonumber(ARGV[11]), tonumber(ARGV[12])
local close_after, floor_ms = tonumber(ARGV[13]), tonumber(ARGV[14])

local function trip()
  local trips = num('trips', 0)
  local period = math.min(cap_ms, base_ms * 2 ^ trips)
  local until_ms = now_ms + math.floor(period + jitter_u * jitter_ratio * period)
  -- never shorter than the provider's own Retry-After
  if now_ms + floor_ms > until_ms then until_ms = now_ms + floor_ms end
  state = 'open'
  redis.call('HSET', key, 'state', state, 'open_until', fmt(until_ms), 'trips', trips + 1, 'probes', 0)
end

settle_time()
count(not success)
if state == 'closed' and not success then
  local calls, failures = window()
  if calls >= min_calls and failures >= ratio * calls then trip() end
elseif state == 'half_open' and probe then
  if not success then
    trip()
  else
    local successes = redis.call('HINCRBY', key, 'successes', 1)
    if successes >= close_after then
      -- a clean slate: failures from before the outage must not re-trip it at once
      redis.call('DEL', key)
      state = 'closed'
    elseif num('probes', 0) < probes_max then
      redis.call('HINCRBY', key, 'probes', 1)  -- the token goes back for the next probe
    end
  end
elseif state == 'open' and not success and floor_ms > 0 and now_ms + floor_ms > open_until then
  redis.call('HSET', key, 'open_until', fmt(now_ms + floor_ms))
end
return state
