-- accounts_lib: which fal account a slot is on (included by slots_lib, not run alone). The including
-- script declares first: now_ms, slots (ZSET), fair (HASH), capacity (reassigned here) and
-- acct_spec: the pool as 'id:cap[:day_micro:month_micro],...' in the configured order, then
-- '#<max_job_micro>' when an account has a budget (a bare number N is one account 'default' with N
-- slots: the single-account configuration). day_micro / month_micro: the account's budget per UTC
-- day / month in micro-dollars ('-' = none); max_job_micro: the largest reservation a job can hold
-- (worker/flow/budget.py max_job_micro).
--
-- Fields of `fair`: acct:<job> = the account of a slot holder, ause:<account> = slots it holds,
-- adrain:<account> = why it is drained for good (a rejected key; cleared by an operator),
-- adrain_until:<account> = ms until which it is drained (its breaker is open), acct_v = the
-- bookkeeping exists (set once; slots taken before it belong to the first account).
-- Money (micro-dollars): abr:<account> = reserved by the reservations bound to it,
-- abs:<account>:d:<YYYY-MM-DD> / abs:<account>:m:<YYYY-MM> = spent in its latest day / month
-- (abd:<account> / abm:<account> name them; an older period's field is dropped when a newer one is
-- written, budget_lib settle_reservation), so the fields per account stay bounded.
--
-- The budget reservations HASH `<prefix>:fc:budget:res` (worker/flow/budget.py) is read at
-- account_take and the job's entry rewritten with its account: derived from fair `<prefix>:fc:fair`
-- (same hash tag, so the same cluster slot), not declared in KEYS (as `<wait_q>:ready`, slots_lib).
--
-- The rule: a slot is taken on the usable (not drained) account with the most free slots (the
-- first listed on ties), and only when it has one, so an account never holds more than its cap;
-- `capacity` is recomputed as the slots held plus the free slots of usable accounts, so "a slot is
-- free" (ZCARD slots < capacity, the test of choose()) means exactly "a usable account has room".
--
-- Budgets: an account with a budget is usable only while, for today and this month,
-- spent + reserved + max_job_micro <= cap (so any job fits: an account stops taking jobs up to one
-- job's maximum before its cap). A slot's account gets the job's reservation (its micro added to
-- abr, the account appended to the reservation as a 6th field), so spent + reserved <= cap holds
-- for every account at every moment, as for the cluster and its tenants (budget_lib). `reserved`
-- counts every bound reservation against today and this month whatever its own periods
-- (conservative: a reservation of yesterday still held counts today). An account out of budget is
-- skipped, not drained: settlement (a refund: actual < estimate) or a new period gives it room again.

-- @include civil
local acct_day, acct_month
do
  local y, m, d = civil(math.floor(now_ms / 86400000))
  acct_day, acct_month = string.format('%04d-%02d-%02d', y, m, d), string.format('%04d-%02d', y, m)
end
local acct_res = (string.gsub(fair, ':fc:fair$', ':fc:budget:res'))

local accounts, max_job_micro = {}, 0
do
  local spec, ceiling = string.match(acct_spec, '^([^#]*)#(%d+)$')
  if spec then acct_spec, max_job_micro = spec, tonumber(ceiling) end
  local n = tonumber(acct_spec)
  if n then
    accounts[1] = {id = 'default', cap = n}
  else
    for entry in string.gmatch(acct_spec, '[^,]+') do
      local id, cap, dcap, mcap = string.match(entry, '^([^:]+):(%d+):?([%d-]*):?([%d-]*)$')
      if id then
        accounts[#accounts + 1] = {id = id, cap = tonumber(cap), dcap = tonumber(dcap), mcap = tonumber(mcap)}
      end
    end
  end
end

local function acct_num(field) return tonumber(redis.call('HGET', fair, field) or '') or 0 end

-- account a's spent today and this month (0 once the period rolled: its field names an older one)
local function account_spent(id)
  local d = redis.call('HGET', fair, 'abd:' .. id) == acct_day and acct_num('abs:' .. id .. ':d:' .. acct_day) or 0
  local m = redis.call('HGET', fair, 'abm:' .. id) == acct_month and acct_num('abs:' .. id .. ':m:' .. acct_month)
    or 0
  return d, m
end

-- true when `need` more micro-dollars keep account a within its day and month caps (no cap: true)
local function account_fits(a, need)
  if not a.dcap and not a.mcap then return true end
  local d, m = account_spent(a.id)
  local res = acct_num('abr:' .. a.id)
  if a.dcap and d + res + need > a.dcap then return false end
  if a.mcap and m + res + need > a.mcap then return false end
  return true
end

local function account_usable(id)
  if redis.call('HEXISTS', fair, 'adrain:' .. id) == 1 then return false end
  return acct_num('adrain_until:' .. id) <= now_ms
end

-- slots held before the bookkeeping existed (an upgrade from one account) count on the first account
local function accounts_init()
  if redis.call('HSETNX', fair, 'acct_v', 1) == 1 and accounts[1] then
    redis.call('HSET', fair, 'ause:' .. accounts[1].id, redis.call('ZCARD', slots))
  end
end

-- the accounts' counts add up to more than the slots held only if slots left the ZSET some other
-- way than drop_slot (a restored backup, a hand edit): recount them from the holders' accounts
local function recount_if_stale(held)
  local total, listed = 0, {}
  for _, a in ipairs(accounts) do
    total = total + acct_num('ause:' .. a.id)
    listed[a.id] = true
  end
  if total <= held then return end
  for _, a in ipairs(accounts) do redis.call('HDEL', fair, 'ause:' .. a.id) end
  for _, job in ipairs(redis.call('ZRANGE', slots, 0, -1)) do
    local id = redis.call('HGET', fair, 'acct:' .. job) or accounts[1].id
    if listed[id] then redis.call('HINCRBY', fair, 'ause:' .. id, 1) end
  end
end

-- capacity = slots held + free slots of usable accounts (see the rule above)
local function refresh_capacity()
  accounts_init()
  recount_if_stale(redis.call('ZCARD', slots))
  local free = 0
  for _, a in ipairs(accounts) do
    if account_usable(a.id) and account_fits(a, max_job_micro) then
      free = free + math.max(0, a.cap - acct_num('ause:' .. a.id))
    end
  end
  capacity = redis.call('ZCARD', slots) + free
end

-- the usable account with the most free slots (first listed on ties) and budget room for `need`
-- micro-dollars; nil when none has both
local function pick_account(need)
  local best, best_free = nil, 0
  for _, a in ipairs(accounts) do
    if account_usable(a.id) and account_fits(a, need) then
      local free = a.cap - acct_num('ause:' .. a.id)
      if free > best_free then best, best_free = a.id, free end
    end
  end
  return best
end

-- the fields of a reservation 'micro|day|month|at_ms|tenant[|account]'
local function reservation_fields(rec)
  local f = {}
  for part in (rec .. '|'):gmatch('([^|]*)|') do f[#f + 1] = part end
  return f
end

-- bind `job`'s new slot to an account with room (the caller made sure one has: capacity), and the
-- job's budget reservation (if any) to the same account: its micro moves into the account's abr
-- (out of the account a previous slot of the job bound it to), and the reservation names it
local function account_take(job)
  local rec = redis.call('HGET', acct_res, job)
  local f = rec and reservation_fields(rec)
  local micro = f and tonumber(f[1]) or 0
  if f and (f[6] or '') ~= '' and micro > 0 then
    if redis.call('HINCRBY', fair, 'abr:' .. f[6], -micro) <= 0 then redis.call('HDEL', fair, 'abr:' .. f[6]) end
  end
  -- capacity counted only accounts with room for max_job_micro, and no reservation is larger
  -- (worker/flow/budget.py max_job_micro), so one is found; the largest need is asked for anyway
  local id = pick_account(math.max(micro, max_job_micro)) or pick_account(micro)
    or (accounts[1] and accounts[1].id) or 'default'
  redis.call('HSET', fair, 'acct:' .. job, id)
  redis.call('HINCRBY', fair, 'ause:' .. id, 1)
  if f then
    if micro > 0 then redis.call('HINCRBY', fair, 'abr:' .. id, micro) end
    redis.call('HSET', acct_res, job, table.concat({f[1], f[2], f[3], f[4], f[5] or '', id}, '|'))
  end
  return id
end

-- `job`'s slot is gone: its account has room again
local function account_drop(job)
  local id = redis.call('HGET', fair, 'acct:' .. job) or (accounts[1] and accounts[1].id)
  redis.call('HDEL', fair, 'acct:' .. job)
  if id and redis.call('HINCRBY', fair, 'ause:' .. id, -1) <= 0 then redis.call('HDEL', fair, 'ause:' .. id) end
end

-- the account of `job`'s slot ('' when it holds none)
local function account_of(job)
  return redis.call('HGET', fair, 'acct:' .. job) or ''
end

-- `job` holds a slot and a reservation no account carries yet (a resubmit kept its slot and
-- settled its former reservation, then reserved again): the slot's account carries it if it fits
-- there (true), else nothing changes and false is returned (the caller gives the slot up)
local function account_bind_held(job)
  local rec = redis.call('HGET', acct_res, job)
  if not rec then return true end
  local f = reservation_fields(rec)
  if (f[6] or '') ~= '' then return true end
  local id, micro = account_of(job), tonumber(f[1]) or 0
  if id == '' then id = accounts[1] and accounts[1].id or 'default' end
  for _, a in ipairs(accounts) do
    if a.id == id and not account_fits(a, micro) then return false end
  end
  if micro > 0 then redis.call('HINCRBY', fair, 'abr:' .. id, micro) end
  redis.call('HSET', acct_res, job, table.concat({f[1], f[2], f[3], f[4], f[5] or '', id}, '|'))
  return true
end
