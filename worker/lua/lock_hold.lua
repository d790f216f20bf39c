-- lock_hold: take or renew a lock held by a token (the housekeeper's).
-- KEYS: 1 lock. ARGV: 1 token, 2 ttl ms.
-- Returns 1 if the caller holds the lock now (taken or renewed), 0 if another token holds it.
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not cur then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
