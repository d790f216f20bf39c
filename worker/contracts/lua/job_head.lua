-- job_head: binds the KEYS and options every lifecycle script shares, and the fence.
-- KEYS: 1 job record, 2 slots ZSET, 3 waiting SET, 4 wait_q ZSET, 5 fair HASH, 6 tenant params HASH
--       (the slot pool, see slots_lib),
--       7 budget reservations HASH, 8 delayed ZSET, 9 blocked ZSET, 10 track ZSET, 11 track owner HASH,
--       12 and 13 the day and month budget keys of the job's reservation (today's when it has none),
--       14 and 15 the same periods of the reservation's tenant (any key when it has none),
--       16 the cost ledger STREAM (settlements append to it).
-- ARGV: 1 job id, 2 options as JSON (see each script); always: capacity, accounts (the fal accounts
--       'id:cap,...', see accounts_lib; absent = one account of `capacity`), reserved, lease_ms, bprefix,
--       and the fence: attempt (the record's `attempt` must equal it; '' = none), request_id (the
--       record's `fal_request_id` must equal it; absent = none), from (allowed states; absent = any
--       non-terminal state).
-- @include now
local job_key, job_id = KEYS[1], ARGV[1]
local opt = cjson.decode(ARGV[2])
local slots, waiting = KEYS[2], KEYS[3]
local wait_q, fair, params = KEYS[4], KEYS[5], KEYS[6]
local capacity, reserved, lease_ms = tonumber(opt.capacity), tonumber(opt.reserved), tonumber(opt.lease_ms)
local acct_spec = opt.accounts or tostring(capacity)
local bprefix, reservations = opt.bprefix, KEYS[7]
local delayed, blocked, track, track_owner = KEYS[8], KEYS[9], KEYS[10], KEYS[11]
local bdeclared = {[KEYS[12]] = true, [KEYS[13]] = true, [KEYS[14]] = true, [KEYS[15]] = true}
local ledger = KEYS[16]
-- @include slots_lib
-- @include budget_lib

local TERMINAL = {SUCCEEDED = true, FAILED = true, CANCELLED = true}

-- nil when the caller owns the job as it claims; else the state that refused it ('' = no record)
local function fence()
  local state = redis.call('HGET', job_key, 'state')
  if not state then return '' end
  if TERMINAL[state] then return state end
  if opt.attempt and opt.attempt ~= '' and redis.call('HGET', job_key, 'attempt') ~= opt.attempt then
    return state
  end
  if opt.request_id and (redis.call('HGET', job_key, 'fal_request_id') or '') ~= opt.request_id then
    return state
  end
  if opt.from then
    local ok = false
    for _, s in ipairs(opt.from) do if s == state then ok = true end end
    if not ok then return state end
  end
  return nil
end

-- nil when the budget keys the transition's budget action needs were passed (checked before any write)
local function budget_keys_missing()
  if opt.budget == 'release' or opt.budget == 'settle' then return check_reservation_keys(job_id) end
  return nil
end

-- what the transition frees: the slot ('keep' | 'release' | 'drop' = release without admitting,
-- for callers that do not know the cluster's capacity | 'hold' for hold_ms) and the budget
-- reservation ('keep' | 'release' | 'settle' at settle_micro, with the ledger entry's billed_s and
-- ledger_kind). Returns the ids admitted into freed slots.
local function free_resources()
  local admitted = {}
  -- the money first: a fal account's budget room (accounts_lib) freed by this settlement is then
  -- seen by the admission of the freed slot
  if opt.budget == 'release' then
    settle_reservation(job_id, -1)
  elseif opt.budget == 'settle' then
    local who = redis.call('HMGET', job_key, 'attempt', 'fal_request_id')
    settle_reservation(job_id, tonumber(opt.settle_micro), {
      attempt = who[1] or '', request_id = who[2] or '', billed_s = opt.billed_s or '',
      kind = opt.ledger_kind or 'settled'})
  end
  if opt.slot == 'release' then
    admitted = release_slot(job_id)
  elseif opt.slot == 'drop' then
    drop_slot(job_id)
    unqueue(job_id)
  elseif opt.slot == 'hold' then
    unqueue(job_id)
    if redis.call('ZSCORE', slots, job_id) then
      redis.call('ZADD', slots, now_ms + tonumber(opt.hold_ms), job_id)
    end
  end
  return admitted
end

-- record fields: set (name -> string), incr (name -> integer), del (names)
local function write_fields()
  if opt.set then
    for k, v in pairs(opt.set) do redis.call('HSET', job_key, k, v) end
  end
  if opt.incr then
    for k, v in pairs(opt.incr) do redis.call('HINCRBY', job_key, k, v) end
  end
  if opt.del then
    for _, k in ipairs(opt.del) do redis.call('HDEL', job_key, k) end
  end
end
