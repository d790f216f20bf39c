-- budget_lib: spend periods and reservations (included, not run alone).
-- The including script declares first: now_ms (include now), bprefix (the key prefix),
-- reservations (the HASH key job -> "micro|day|month|reserved_at_ms"), and bdeclared (a set of the
-- period keys it was given in KEYS). A script touches only declared keys: it first checks with
-- check_today_keys() / check_reservation_keys(job) and, when a period key it needs was not
-- passed (a date changed between the caller's read and the script), refuses with
-- 'BUDGET_KEYS:<day>|<month>' before writing anything; the caller retries with those keys.
-- @include civil
local y, m, d = civil(math.floor(now_ms / 86400000))
local today = string.format('%04d-%02d-%02d', y, m, d)
local this_month = string.format('%04d-%02d', y, m)
local function day_key(day) return bprefix .. ':fc:budget:day:' .. day end
local function month_key(month) return bprefix .. ':fc:budget:month:' .. month end
local function bfield(k, f) return tonumber(redis.call('HGET', k, f)) or 0 end
local function parse_reservation(rec)
  local est, day, month = string.match(rec, '^(%d+)|([^|]+)|([^|]+)|')
  return tonumber(est), day, month
end
-- take a reservation back out of a period; never below zero (a period key may have expired)
local function unreserve(k, est)
  if est == 0 then return end  -- Lua would send -0, which HINCRBY refuses
  if redis.call('HINCRBY', k, 'reserved', -est) < 0 then redis.call('HSET', k, 'reserved', 0) end
end
-- nil when today's period keys are declared, else the refusal naming them
local function check_today_keys()
  if bdeclared[day_key(today)] and bdeclared[month_key(this_month)] then return nil end
  return 'BUDGET_KEYS:' .. today .. '|' .. this_month
end
-- nil when the periods of `job`'s reservation (if any) are declared, else the refusal naming them
local function check_reservation_keys(job)
  local rec = redis.call('HGET', reservations, job)
  if not rec then return nil end
  local _, day, month = parse_reservation(rec)
  if bdeclared[day_key(day)] and bdeclared[month_key(month)] then return nil end
  return 'BUDGET_KEYS:' .. day .. '|' .. month
end
-- drop `job`'s reservation, charging `actual` micro-dollars (actual < 0: charge nothing).
-- Returns {1, est} when there was a reservation, {0, 0} otherwise (a second settle is a no-op).
local function settle_reservation(job, actual)
  local rec = redis.call('HGET', reservations, job)
  if not rec then return {0, 0} end
  local est, day, month = parse_reservation(rec)
  for _, k in ipairs({day_key(day), month_key(month)}) do
    unreserve(k, est)
    if actual > 0 then redis.call('HINCRBY', k, 'spent', actual) end
  end
  redis.call('HDEL', reservations, job)
  return {1, est}
end
