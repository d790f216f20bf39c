-- dedupe_release: a job that did the work of a canonical input has ended (lifecycle.finish, after
-- its fenced finish.lua): it stops being the leader, a success is remembered for the retention
-- window, and the followers are handed back to be dispatched (they look again and are served, or
-- one of them leads when the leader did not succeed).
-- KEYS: 1 the job's record HASH, 2 the leader STRING (P:dedupe:{c}), 3 the done STRING
--       (P:dedupe:done:{c}), 4 the followers ZSET (P:dedupe:followers:{c}).
-- ARGV: 1 job id, 2 done retention ms.
-- Returns the follower ids to dispatch (none unless the job was the leader); a job that is not
-- terminal changes nothing.
local state = redis.call('HGET', KEYS[1], 'state') or ''
if state ~= 'SUCCEEDED' and state ~= 'FAILED' and state ~= 'CANCELLED' then return {} end
local led = redis.call('GET', KEYS[2]) == ARGV[1]
if led then redis.call('DEL', KEYS[2]) end
if state == 'SUCCEEDED' and (redis.call('HGET', KEYS[1], 'deduped_from') or '') == ''
    and (redis.call('HGET', KEYS[1], 'result') or '') ~= '' then
  redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
end
if not led then return {} end
local followers = redis.call('ZRANGE', KEYS[4], 0, -1)
redis.call('DEL', KEYS[4])
return followers
