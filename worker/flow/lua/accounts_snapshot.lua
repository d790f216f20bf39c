-- accounts_snapshot: read-only view of the fal accounts.
-- KEYS: 1..5 as slots_head. ARGV: 1..3 as slots_head.
-- Returns one {id, cap, in_use, usable (1/0), drain reason, drained until ms} per account, in order.
-- @include slots_head
local out = {}
for _, a in ipairs(accounts) do
  out[#out + 1] = {a.id, a.cap, acct_num('ause:' .. a.id), account_usable(a.id) and 1 or 0,
                   redis.call('HGET', fair, 'adrain:' .. a.id) or '', acct_num('adrain_until:' .. a.id)}
end
return out
