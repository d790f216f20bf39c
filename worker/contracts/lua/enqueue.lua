-- enqueue: write a batch of jobs (records, idempotency claims, Celery submit messages, the tenant's
-- listing index), all or nothing. Used for one job too (a batch of one). The caller bounds n
-- (REFRAME_ENQUEUE_MAX_BATCH) so one call cannot hold Redis for long, and removes duplicate
-- idempotency keys from the batch first. Every job of one call belongs to one tenant.
-- KEYS: three per item i (1-based): KEYS[3i-2] job record hash, KEYS[3i-1] idempotency claim (the
--       sentinel ARGV[1] when the item has no key), KEYS[3i] the Celery list of the item's priority;
--       then KEYS[3n+1] the `queued` ZSET (job -> enqueue ms) the lost-message sweep reads,
--       KEYS[3n+2] the tenant's index ZSET (job -> created ms), KEYS[3n+3] every job's index ZSET,
--       KEYS[3n+4] the tenant's limits HASH (its `dedupe` field: on | off, read when an item has none).
-- ARGV: [1] the no-key sentinel (a key of the prefix no claim can have; claims live as long as
--       their record: finish.lua gives both the record's TTL),
--       [2] item count n, [3] tenant, [4] index horizon ms (index entries created longer ago are
--       trimmed, and an index expires that long after its last enqueue: no record lives that
--       long), [5] the cluster's dedupe default (1 | 0: REFRAME_DEDUPE_DEFAULT),
--       then per item: job_id, fingerprint, message, field
--       count f, then f field/value pairs of the initial record (its `dedupe` field '' = not said:
--       resolved here, request > tenant > cluster, to 1 or 0).
-- Returns {0, i, job_id, i, job_id, ...} when an item's key is already claimed with another fingerprint
--   (job_id = the claiming job), or its new job id already exists (job_id = ''); nothing is written.
--   Otherwise {1, now_ms, then per item: created (1|0), job_id}: created 0 means the key was already
--   claimed with the same fingerprint and job_id is that existing job (nothing new written for it).
-- Raises an error (nothing written) if one idempotency key appears twice in the batch.
-- @include now

local n = tonumber(ARGV[2])
local items = {}
local pos = 6
for i = 1, n do
  local nf = tonumber(ARGV[pos + 3])
  items[i] = {id = ARGV[pos], fp = ARGV[pos + 1], msg = ARGV[pos + 2], first = pos + 4, last = pos + 3 + nf * 2}
  pos = pos + 4 + nf * 2
end

-- Phase 1: read every claim; write nothing unless every item can go ahead.
local conflicts = {0}
local existing = {}
local seen = {}
for i = 1, n do
  local idem = KEYS[3 * i - 1]
  if idem ~= ARGV[1] then
    if seen[idem] then return redis.error_reply('duplicate idempotency key in one batch') end
    seen[idem] = true
    local raw = redis.call('GET', idem)
    if raw then
      local claim = cjson.decode(raw)
      if claim.fingerprint == items[i].fp then
        existing[i] = claim.job_id
      else
        conflicts[#conflicts + 1] = i
        conflicts[#conflicts + 1] = claim.job_id
      end
    end
  end
  if not existing[i] and redis.call('EXISTS', KEYS[3 * i - 2]) == 1 then
    conflicts[#conflicts + 1] = i
    conflicts[#conflicts + 1] = ''
  end
end
if #conflicts > 1 then return conflicts end

-- Phase 2: write every new job: record, submit message and claim together.
local tenant_dedupe = redis.call('HGET', KEYS[3 * n + 4], 'dedupe')
if tenant_dedupe == 'on' then tenant_dedupe = '1' elseif tenant_dedupe == 'off' then tenant_dedupe = '0'
else tenant_dedupe = ARGV[5] end
local reply = {1, now_ms}
for i = 1, n do
  local it = items[i]
  if existing[i] then
    reply[#reply + 1] = 0
    reply[#reply + 1] = existing[i]
  else
    redis.call('HSET', KEYS[3 * i - 2], 'created_at_ms', now_ms, 'updated_at_ms', now_ms, 'ts_QUEUED', now_ms,
      'tenant', ARGV[3], unpack(ARGV, it.first, it.last))
    if (redis.call('HGET', KEYS[3 * i - 2], 'dedupe') or '') == '' then
      redis.call('HSET', KEYS[3 * i - 2], 'dedupe', tenant_dedupe)
    end
    redis.call('LPUSH', KEYS[3 * i], it.msg)
    redis.call('ZADD', KEYS[3 * n + 1], now_ms, it.id)
    redis.call('ZADD', KEYS[3 * n + 2], now_ms, it.id)
    redis.call('ZADD', KEYS[3 * n + 3], now_ms, it.id)
    if KEYS[3 * i - 1] ~= ARGV[1] then
      redis.call('SET', KEYS[3 * i - 1], cjson.encode({job_id = it.id, fingerprint = it.fp}))
    end
    reply[#reply + 1] = 1
    reply[#reply + 1] = it.id
  end
end
local oldest = now_ms - tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[3 * n + 2], '-inf', '(' .. oldest)
redis.call('ZREMRANGEBYSCORE', KEYS[3 * n + 3], '-inf', '(' .. oldest)
-- an index nobody enqueues to any more expires with the last record it can name
redis.call('PEXPIRE', KEYS[3 * n + 2], ARGV[4])
redis.call('PEXPIRE', KEYS[3 * n + 3], ARGV[4])
return reply
