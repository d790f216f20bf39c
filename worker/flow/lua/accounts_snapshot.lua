-- accounts_snapshot: read-only view of the fal accounts.
-- KEYS: 1..5 as slots_head. ARGV: 1..3 as slots_head.
-- Returns one {id, cap, in_use, usable (1/0), drain reason, drained until ms, day cap micro, month cap
-- micro (-1 = none), spent today, spent this month, reserved (micro), budget full (1/0)} per account,
-- in order. `usable` is also 0 while its budget is full: no room for one more job (accounts_lib).
-- @include slots_head
local out = {}
for _, a in ipairs(accounts) do
  local d, m = account_spent(a.id)
  local room = account_fits(a, max_job_micro)
  local up = account_usable(a.id) and room
  out[#out + 1] = {a.id, a.cap, acct_num('ause:' .. a.id), up and 1 or 0,
                   redis.call('HGET', fair, 'adrain:' .. a.id) or '', acct_num('adrain_until:' .. a.id),
                   a.dcap or -1, a.mcap or -1, d, m, acct_num('abr:' .. a.id), room and 0 or 1}
end
return out
