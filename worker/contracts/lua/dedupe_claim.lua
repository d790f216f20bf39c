-- dedupe_claim: decide, for a job that wants to pay once for identical work, whether it leads
-- (does the work), follows a live leader (attaches, parked by its caller), or is served from a
-- succeeded job (its result is copied by the caller through lifecycle.finish). Fenced by attempt:
-- only the attempt that owns the job's gate, in a pre-submit state, may claim.
-- KEYS: 1 the job's record HASH, 2 the leader STRING of its canonical input (P:dedupe:{c}),
--       3 the done STRING (P:dedupe:done:{c}), 4 the followers ZSET (P:dedupe:followers:{c}),
--       5 the record HASH of the candidate: the job the caller read from KEYS[3], else from KEYS[2]
--       (the job's own record when neither named one).
-- ARGV: 1 job id, 2 attempt, 3 candidate id ('' = none), 4 leader lease ms (job deadline + slack),
--       5 done retention ms, 6 a done job id the caller refuses to reuse (its result URL is gone; ''),
--       7 the ambiguous hold ms: a leader dead-lettered as an ambiguous submit may still be run (and
--       billed) by fal, so identical jobs follow it that long instead of paying again; its
--       webhook, if it comes, serves them (succeeded at fal) or frees them (failed at fal).
-- Returns {0, state}: the fence refused (nothing changed);
--         {1, job id}: this job leads (the leader STRING names it, lease renewed);
--         {2, leader}: attached as a follower of a live leader;
--         {3, leader, result JSON, cost_actual_micro}: served from that succeeded job;
--         {4, id}: KEYS[2]/KEYS[3] name another job than the candidate: read again and retry;
--         {5, leader}: the leader waits BLOCKED on its tenant's budget: go alone, do not wait.
-- @include now
local job_key, job_id, attempt, cand = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local PRE = {QUEUED = true, WAITING = true, BLOCKED = true, DEFERRED = true}
local TERMINAL = {SUCCEEDED = true, FAILED = true, CANCELLED = true}
local state = redis.call('HGET', job_key, 'state')
if not state then return {0, ''} end
if not PRE[state] or redis.call('HGET', job_key, 'attempt') ~= attempt then return {0, state} end

local function cand_state() return redis.call('HGET', KEYS[5], 'state') or '' end
local function served(from)
  local f = redis.call('HMGET', KEYS[5], 'result', 'cost_actual_micro')
  if not f[1] or f[1] == '' then return nil end
  redis.call('ZREM', KEYS[4], job_id)
  return {3, from, f[1], f[2] or '0'}
end

local done = redis.call('GET', KEYS[3]) or ''
if done ~= '' and done ~= job_id then
  if done == ARGV[6] then
    if redis.call('GET', KEYS[2]) == done then redis.call('DEL', KEYS[2]) end
    redis.call('DEL', KEYS[3])
  elseif done ~= cand then
    return {4, done}
  else
    local hit = cand_state() == 'SUCCEEDED' and served(done)
    if hit then return hit end
    redis.call('DEL', KEYS[3]) -- names a record that expired or holds no result
  end
end

local leader = redis.call('GET', KEYS[2]) or ''
if leader == job_id then
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
  return {1, job_id}
end
if leader ~= '' then
  if leader ~= cand then return {4, leader} end
  local s = cand_state()
  if s == 'SUCCEEDED' and leader ~= ARGV[6] then
    -- the leader ended and its release (dedupe_release.lua) did not run: do it now
    redis.call('DEL', KEYS[2])
    redis.call('SET', KEYS[3], leader, 'PX', ARGV[5])
    local hit = served(leader)
    if hit then return hit end
  elseif s == 'BLOCKED' then
    return {5, leader}
  elseif s == 'FAILED' and (redis.call('HGET', KEYS[5], 'dead_letter_reason') or '') == 'ambiguous_submit' then
    local f = redis.call('HMGET', KEYS[5], 'ambiguous_resolved', 'result', 'cost_actual_micro', 'finished_at_ms')
    if f[1] == 'succeeded_at_fal' and f[2] and f[2] ~= '' and leader ~= ARGV[6] then
      redis.call('ZREM', KEYS[4], job_id)
      return {3, leader, f[2], f[3] or '0'}
    end
    if not f[1] and now_ms - (tonumber(f[4]) or 0) < tonumber(ARGV[7] or '0') then
      redis.call('ZADD', KEYS[4], now_ms, job_id)
      redis.call('PEXPIRE', KEYS[4], ARGV[4])
      redis.call('HSET', job_key, 'dedupe_role', 'follower', 'dedupe_leader', leader)
      return {2, leader}
    end
  elseif s ~= '' and not TERMINAL[s] then
    redis.call('ZADD', KEYS[4], now_ms, job_id)
    redis.call('PEXPIRE', KEYS[4], ARGV[4])
    redis.call('HSET', job_key, 'dedupe_role', 'follower', 'dedupe_leader', leader)
    return {2, leader}
  end
end
-- no live leader (none, or it failed, was cancelled or expired, or its ambiguous submit is
-- resolved as failed at fal or held past the ambiguous hold): this job leads
redis.call('SET', KEYS[2], job_id, 'PX', ARGV[4])
redis.call('ZREM', KEYS[4], job_id)
redis.call('HSET', job_key, 'dedupe_role', 'leader', 'dedupe_leader', '')
return {1, job_id}
