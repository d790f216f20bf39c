-- breaker_head: binds the breaker's KEYS and ARGV and defines its helpers (included).
-- KEYS: 1 the breaker HASH (state, open_until, trips, probes, probe_deadline, successes and ring
--       buckets n:{i} / c:{i} / f:{i} = bucket number / calls / failures of slot i).
-- ARGV: 1 bucket ms, 2 bucket count, 3 probes (P), 4 probe lease ms; script-specific ones follow.
-- @include now
local key = KEYS[1]
local bucket_ms, nbuckets = tonumber(ARGV[1]), tonumber(ARGV[2])
local probes_max, probe_lease_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
local function num(field, default)
  return tonumber(redis.call('HGET', key, field)) or default
end
local function fmt(x) return string.format('%.0f', x) end
local state = redis.call('HGET', key, 'state') or 'closed'
local open_until = num('open_until', 0)

local function window()
  local current = math.floor(now_ms / bucket_ms)
  local calls, failures = 0, 0
  for i = 0, nbuckets - 1 do
    local n = num('n:' .. i, -1)
    if n > current - nbuckets and n <= current then
      calls = calls + num('c:' .. i, 0)
      failures = failures + num('f:' .. i, 0)
    end
  end
  return calls, failures
end

local function count(failed)
  local current = math.floor(now_ms / bucket_ms)
  local i = current % nbuckets
  if num('n:' .. i, -1) ~= current then
    redis.call('HSET', key, 'n:' .. i, fmt(current), 'c:' .. i, 0, 'f:' .. i, 0)
  end
  redis.call('HINCRBY', key, 'c:' .. i, 1)
  if failed then redis.call('HINCRBY', key, 'f:' .. i, 1) end
end

local function half_open()
  state = 'half_open'
  redis.call('HSET', key, 'state', state, 'probes', probes_max, 'successes', 0,
             'probe_deadline', fmt(now_ms + probe_lease_ms))
end

-- OPEN ends by itself at open_until: the first caller after it moves the breaker to HALF_OPEN
local function settle_time()
  if state == 'open' and now_ms >= open_until then half_open() end
  -- probes whose holders vanished (crash) without reporting are given back after their lease
  if state == 'half_open' and num('probes', 0) < probes_max and now_ms >= num('probe_deadline', 0) then
    redis.call('HSET', key, 'probes', probes_max, 'probe_deadline', fmt(now_ms + probe_lease_ms))
  end
end
