-- accounts_lib: which fal account a slot is on (included by slots_lib, not run alone). The including
-- script declares first: now_ms, slots (ZSET), fair (HASH), capacity (reassigned here) and
-- acct_spec: the pool as 'id:cap,id:cap,...' in the configured order (a bare number N is one
-- account 'default' with N slots: the single-account configuration).
--
-- Fields of `fair`: acct:<job> = the account of a slot holder, ause:<account> = slots it holds,
-- adrain:<account> = why it is drained for good (a rejected key; cleared by an operator),
-- adrain_until:<account> = ms until which it is drained (its breaker is open), acct_v = the
-- bookkeeping exists (set once; slots taken before it belong to the first account).
--
-- The rule: a slot is taken on the usable (not drained) account with the most free slots (the
-- first listed on ties), and only when it has one, so an account never holds more than its cap;
-- `capacity` is recomputed as the slots held plus the free slots of usable accounts, so "a slot is
-- free" (ZCARD slots < capacity, the test of choose()) means exactly "a usable account has room".

local accounts = {}
do
  local n = tonumber(acct_spec)
  if n then
    accounts[1] = {id = 'default', cap = n}
  else
    for id, cap in string.gmatch(acct_spec, '([^:,]+):(%d+)') do
      accounts[#accounts + 1] = {id = id, cap = tonumber(cap)}
    end
  end
end

local function acct_num(field) return tonumber(redis.call('HGET', fair, field) or '') or 0 end

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
    if account_usable(a.id) then free = free + math.max(0, a.cap - acct_num('ause:' .. a.id)) end
  end
  capacity = redis.call('ZCARD', slots) + free
end

-- the usable account with the most free slots (first listed on ties); nil when none has one
local function pick_account()
  local best, best_free = nil, 0
  for _, a in ipairs(accounts) do
    if account_usable(a.id) then
      local free = a.cap - acct_num('ause:' .. a.id)
      if free > best_free then best, best_free = a.id, free end
    end
  end
  return best
end

-- bind `job`'s new slot to an account with room (the caller made sure one has: capacity)
local function account_take(job)
  local id = pick_account() or (accounts[1] and accounts[1].id) or 'default'
  redis.call('HSET', fair, 'acct:' .. job, id)
  redis.call('HINCRBY', fair, 'ause:' .. id, 1)
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
