-- tenant_tag: after an enqueue over HTTP, bind each job to its tenant and index it for listing.
-- Not part of the enqueue script (worker/contracts/lua/enqueue.lua), so it runs right after it; a
-- job whose tagging was lost (the API process died in between) is tagged again by a retry with the
-- same Idempotency-Key. A record that no longer exists is never recreated.
-- KEYS: [1] the tenant's index ZSET (job id -> created_at_ms), [2] the all-tenants index ZSET,
--       then one job record HASH per job id.
-- ARGV: [1] tenant, [2] horizon ms (index entries created longer ago than this are trimmed),
--       then the job ids (same order as KEYS[3..]).
-- Returns the number of jobs tagged (records that exist).
-- @include now
local tagged = 0
for i = 3, #ARGV do
  local job = KEYS[i]
  if redis.call('EXISTS', job) == 1 then
    redis.call('HSETNX', job, 'tenant', ARGV[1])
    local created = tonumber(redis.call('HGET', job, 'created_at_ms')) or now_ms
    redis.call('ZADD', KEYS[1], 'NX', created, ARGV[i])
    redis.call('ZADD', KEYS[2], 'NX', created, ARGV[i])
    tagged = tagged + 1
  end
end
local oldest = now_ms - tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. oldest)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. oldest)
return tagged
