-- account_drain: drain a fal account (no new slot goes to it; slots it holds stay until released).
-- KEYS: 1..5 as slots_head. ARGV: 1..3 as slots_head; 4 account id, 5 reason (a rejected key:
--       drained until account_undrain) or '' with 6 until_ms (drained until then: an open breaker;
--       extends, never shortens).
-- Returns 1 when this call drained it (it was usable before), else 0.
-- @include slots_head
local id = ARGV[4]
local was = account_usable(id)
if ARGV[5] ~= '' then
  redis.call('HSET', fair, 'adrain:' .. id, ARGV[5])
else
  local until_ms = tonumber(ARGV[6])
  if until_ms > acct_num('adrain_until:' .. id) then redis.call('HSET', fair, 'adrain_until:' .. id, until_ms) end
end
if was and not account_usable(id) then return 1 end
return 0
