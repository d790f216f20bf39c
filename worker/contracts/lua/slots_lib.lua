-- slots_lib: the slot pool's shared functions, with weighted fair shares between tenants
-- (included, not run alone). The including script declares first: now_ms (include now), slots (ZSET
-- job -> lease deadline), waiting (SET of waiting ids), wait_q (ZSET, all scores 0, of waiting
-- entries '<tenant>|<priority 1..3>|<seq>|<job>': lexical order = per tenant, by priority, then
-- FIFO), fair (HASH: pos:<job> = its wait_q entry, use:<tenant> = slots it holds, own:<job> = the
-- tenant of a slot holder, depth:<priority> = waiting per priority, seq, vt:<tenant> = its virtual
-- time, vnow = the virtual time of the last admission), params (HASH: w:<tenant>
-- weight, max:<tenant> most concurrent slots; written by `reframe tenants set`), capacity,
-- reserved (slots kept for high), lease_ms.
--
-- The rule (one decision per free slot, in the script that frees it): among tenants with a job that
-- may take the slot (a reserved-high slot serves only high; a tenant at its max_concurrent waits),
-- the slot goes to the one with the lowest use/weight; ties go to the lowest virtual time (each
-- admission adds 1/weight to its tenant's; a tenant that becomes active starts at the last
-- admission's, as in start-time fair queuing), so while more tenants wait than there are slots
-- and they all tie at zero, admissions still follow the weights; then the higher priority, then
-- the older entry. Within the chosen tenant: its best entry, priority then FIFO. This is progressive
-- filling: while tenants A and B both wait, use_A/w_A and use_B/w_B never differ by more than one
-- slot's worth (1/w of the one just served) after a decision, so each tenant's share of the slots
-- stays within one slot of its weighted share; a tenant with nothing waiting takes no slot, and
-- its share is used by the others (work-conserving).
--
-- The decision is O(log tenants), not a scan: every tenant that may take a slot has one member
-- in the index ZSET `<wait_q>:ready` (all scores 0), '<use/weight>|<vt>|<priority>|<seq>|<its
-- best entry>' with the numbers fixed-width, so the first member in lex order is the rule's
-- choice; `<wait_q>:ready:high` holds the members whose best entry is high (what a reserved-high
-- slot may serve). Both keys are derived from wait_q (same hash tag). fair `rk:<tenant>` names a
-- tenant's member; refresh() rewrites it whenever the tenant's slots, virtual time or best entry
-- change, and leaves out a tenant at its max_concurrent. Changing a weight or a cap
-- (worker/contracts/tenants.py) deletes fair `ix`, so the next decision rebuilds the index once
-- from wait_q (also how a queue written before the index existed gets indexed).

local ready_ix, ready_high_ix = wait_q .. ':ready', wait_q .. ':ready:high'

local function hnum(field) return tonumber(redis.call('HGET', fair, field)) or 0 end
local function weight_of(t) return tonumber(redis.call('HGET', params, 'w:' .. t) or '') or 1 end
local function has_waiting(t)
  return redis.call('ZRANGEBYLEX', wait_q, '[' .. t .. '|', '[' .. t .. '|\255', 'LIMIT', 0, 1)[1] ~= nil
end
-- a tenant with nothing waiting and no slot forgets its virtual time (it restarts at vnow)
local function forget_if_idle(t)
  if hnum('use:' .. t) <= 0 and not has_waiting(t) then redis.call('HDEL', fair, 'vt:' .. t) end
end

-- the tenant, priority and seq of a wait_q entry
local function parse_entry(entry)
  local t, p, seq, job = string.match(entry, '^([^|]*)|(%d)|(%d+)|(.+)$')
  return t, tonumber(p), seq, job
end

-- tenant t's best entry whose job is still waiting; entries whose job left the waiting set some
-- other way are dropped on the way
local function live_head_of(t)
  while true do
    local entry = redis.call('ZRANGEBYLEX', wait_q, '[' .. t .. '|', '[' .. t .. '|\255', 'LIMIT', 0, 1)[1]
    if not entry then return nil end
    local _, p, _, job = parse_entry(entry)
    if redis.call('SISMEMBER', waiting, job) == 1 then return entry end
    redis.call('ZREM', wait_q, entry)
    redis.call('HDEL', fair, 'pos:' .. job)
    if redis.call('HINCRBY', fair, 'depth:' .. p, -1) < 0 then redis.call('HSET', fair, 'depth:' .. p, 0) end
  end
end

-- rewrite tenant t's member of the ready indexes from its state now (see the header)
local function refresh(t)
  local old = redis.call('HGET', fair, 'rk:' .. t)
  if old then
    redis.call('ZREM', ready_ix, old)
    redis.call('ZREM', ready_high_ix, old)
  end
  local head = live_head_of(t)
  local cap = tonumber(redis.call('HGET', params, 'max:' .. t) or '')
  local use = hnum('use:' .. t)
  if not head or (cap and use >= cap) then
    if old then redis.call('HDEL', fair, 'rk:' .. t) end
    return
  end
  local _, p, seq = parse_entry(head)
  local member = string.format('%025.9f|%025.9f|%d|%s|', use / weight_of(t), hnum('vt:' .. t), p, seq) .. head
  redis.call('ZADD', ready_ix, 0, member)
  if p == 1 then redis.call('ZADD', ready_high_ix, 0, member) end
  redis.call('HSET', fair, 'rk:' .. t, member)
end

local function unqueue(job)
  if redis.call('SREM', waiting, job) == 0 then return 0 end
  local entry = redis.call('HGET', fair, 'pos:' .. job)
  if entry then
    local t, p = parse_entry(entry)
    redis.call('ZREM', wait_q, entry)
    redis.call('HDEL', fair, 'pos:' .. job)
    if redis.call('HINCRBY', fair, 'depth:' .. p, -1) < 0 then redis.call('HSET', fair, 'depth:' .. p, 0) end
    forget_if_idle(t)
    refresh(t)
  end
  return 1
end

-- queue `job` of `tenant` at priority p (1 high .. 3 low), once
local function enqueue_wait(job, tenant, p)
  if redis.call('SISMEMBER', waiting, job) == 1 then return end
  if hnum('use:' .. tenant) <= 0 and not has_waiting(tenant) then
    -- becoming active: start at the last admission's virtual time, not before it (no catching up
    -- on service missed while it had nothing to do)
    local vnow = hnum('vnow')
    if hnum('vt:' .. tenant) < vnow then redis.call('HSET', fair, 'vt:' .. tenant, vnow) end
  end
  local seq = redis.call('HINCRBY', fair, 'seq', 1)
  local entry = tenant .. '|' .. p .. '|' .. string.format('%016d', seq) .. '|' .. job
  redis.call('ZADD', wait_q, 0, entry)
  redis.call('HSET', fair, 'pos:' .. job, entry)
  redis.call('HINCRBY', fair, 'depth:' .. p, 1)
  redis.call('SADD', waiting, job)
  refresh(tenant)
end

local function take_slot(job, tenant)
  redis.call('ZADD', slots, now_ms + lease_ms, job)
  redis.call('HSET', fair, 'own:' .. job, tenant)
  redis.call('HINCRBY', fair, 'use:' .. tenant, 1)
  local vt = hnum('vt:' .. tenant)
  if vt > hnum('vnow') then redis.call('HSET', fair, 'vnow', vt) end  -- never backwards
  redis.call('HINCRBYFLOAT', fair, 'vt:' .. tenant, 1 / weight_of(tenant))
  refresh(tenant)
end

local function drop_slot(job)
  if redis.call('ZREM', slots, job) == 0 then return end
  local tenant = redis.call('HGET', fair, 'own:' .. job)
  if tenant then
    redis.call('HDEL', fair, 'own:' .. job)
    if redis.call('HINCRBY', fair, 'use:' .. tenant, -1) <= 0 then redis.call('HDEL', fair, 'use:' .. tenant) end
    forget_if_idle(tenant)
    refresh(tenant)
  end
end

-- index every tenant of wait_q afresh when fair `ix` is missing (see the header)
local function ensure_index()
  if redis.call('HEXISTS', fair, 'ix') == 1 then return end
  redis.call('DEL', ready_ix, ready_high_ix)
  local probe = redis.call('ZRANGEBYLEX', wait_q, '-', '+', 'LIMIT', 0, 1)[1]
  while probe do
    local t = parse_entry(probe)
    redis.call('HDEL', fair, 'rk:' .. t)
    refresh(t)
    probe = redis.call('ZRANGEBYLEX', wait_q, '(' .. t .. '|\255', '+', 'LIMIT', 0, 1)[1]
  end
  redis.call('HSET', fair, 'ix', 1)
end

-- the entry that should take the next free slot (nil: none may), by the rule above
local function choose()
  local used = redis.call('ZCARD', slots)
  if used >= capacity then return nil end
  ensure_index()
  local ix = ready_ix
  if used >= capacity - reserved then ix = ready_high_ix end
  while true do
    local member = redis.call('ZRANGEBYLEX', ix, '-', '+', 'LIMIT', 0, 1)[1]
    if not member then return nil end
    local entry = string.match(member, '^[^|]*|[^|]*|[^|]*|[^|]*|(.*)$')
    local t, _, _, job = parse_entry(entry)
    if redis.call('SISMEMBER', waiting, job) == 1 then return entry end
    redis.call('ZREM', ix, member)
    refresh(t)  -- its job left the line some other way: the tenant's next entry stands in
  end
end

-- admit waiting jobs into free slots, one fair decision per slot
local function admit_all()
  local admitted = {}
  while true do
    local entry = choose()
    if not entry then return admitted end
    local t, _, _, job = parse_entry(entry)
    if not redis.call('ZSCORE', slots, job) then
      take_slot(job, t)  -- before unqueue: the tenant is not idle in between
      table.insert(admitted, job)
    end
    unqueue(job)
  end
end

-- waiting entries of `job`'s tenant that are served before it (its place in its tenant's line)
local function ahead_of(job)
  local entry = redis.call('HGET', fair, 'pos:' .. job)
  if not entry then return 0 end
  local t = parse_entry(entry)
  return redis.call('ZLEXCOUNT', wait_q, '[' .. t .. '|', '(' .. entry)
end

-- give back `job`'s slot (if any), take it out of the queue, and admit waiters into free slots
local function release_slot(job)
  drop_slot(job)
  unqueue(job)
  return admit_all()
end
