-- authorize: check an API key and take one request token of its rate (GCRA), in one round trip.
-- The token's hash is compared here so a caller who knows only a key id (not secret: it is listed
-- and logged) cannot spend that key's rate. GCRA as in worker/flow/lua/rate_acquire.lua, per key.
-- KEYS: [1] the key's HASH (sha256, tenant, scopes, revoked_at_ms, rate_per_s, burst),
--       [2] the key's GCRA STRING (theoretical arrival time, microseconds).
-- ARGV: [1] sha256 hex of the presented token, [2] default rate per second, [3] default burst.
-- Returns {0} unknown key, wrong token or revoked; otherwise
--   {1, tenant, scopes, allowed 0|1, retry_after_ms}.
-- @include now
local h = redis.call('HMGET', KEYS[1], 'sha256', 'tenant', 'scopes', 'revoked_at_ms', 'rate_per_s', 'burst')
if not h[1] or h[1] ~= ARGV[1] or (h[4] and h[4] ~= '') then
  return {0}
end
local rate = tonumber(h[5]) or tonumber(ARGV[2])
local burst = tonumber(h[6]) or tonumber(ARGV[3])
local interval = math.ceil(1000000 / rate)
local tolerance = interval * (burst - 1)
local tat = tonumber(redis.call('GET', KEYS[2])) or now_us
if tat < now_us then tat = now_us end
if tat - now_us > tolerance then
  return {1, h[2], h[3], 0, math.ceil((tat - now_us - tolerance) / 1000)}
end
local new_tat = tat + interval
redis.call('SET', KEYS[2], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now_us) / 1000) + 1)
return {1, h[2], h[3], 1, 0}
