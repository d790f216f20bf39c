-- slots_lib: the slot pool's shared functions (included, not run alone).
-- The including script declares first: now_ms (include now), slots (ZSET key), waiting (SET key),
-- queues ({high, normal, low} LIST keys), capacity, reserved (slots kept for high), lease_ms.

-- high may use every slot; normal and low leave `reserved` slots free for high
local function limit(i)
  if i == 1 then return capacity end
  return capacity - reserved
end

-- first id of queue i that is still waiting; withdrawn ids at the head are dropped on the way so
-- they neither block admission nor make a free slot look contended
local function live_head(i)
  while true do
    local head = redis.call('LINDEX', queues[i], 0)
    if not head then return nil end
    if redis.call('SISMEMBER', waiting, head) == 1 then return head end
    redis.call('LPOP', queues[i])
  end
end

local function unqueue(job)
  if redis.call('SREM', waiting, job) == 1 then
    for i = 1, 3 do redis.call('LREM', queues[i], 0, job) end
    return 1
  end
  return 0
end

-- admit waiting jobs in priority order, FIFO within a priority, while capacity allows
local function admit_all()
  local admitted = {}
  for i = 1, 3 do
    while true do
      local head = live_head(i)
      if not head then break end
      -- limits only shrink from high to low, so a full level means every later level is full too
      if redis.call('ZCARD', slots) >= limit(i) then return admitted end
      redis.call('LPOP', queues[i])
      redis.call('SREM', waiting, head)
      if not redis.call('ZSCORE', slots, head) then
        redis.call('ZADD', slots, now_ms + lease_ms, head)
        table.insert(admitted, head)
      end
    end
  end
  return admitted
end

-- queued entries that will be served before `job` (which sits in queue i, or is about to)
local function ahead_of(job, i)
  local n = 0
  for k = 1, i - 1 do n = n + redis.call('LLEN', queues[k]) end
  local pos = redis.call('LPOS', queues[i], job)
  if pos then return n + pos end
  return n + redis.call('LLEN', queues[i])
end

-- give back `job`'s slot (if any), take it out of the queues, and admit waiters into free slots
local function release_slot(job)
  redis.call('ZREM', slots, job)
  unqueue(job)
  return admit_all()
end
