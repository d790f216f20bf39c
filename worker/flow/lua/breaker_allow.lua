-- breaker_allow: may a submit go now?
-- KEYS: 1 the breaker HASH (see breaker_head).
-- ARGV: 1..4 as breaker_head; 5 retry hint (ms) for callers turned away in HALF_OPEN.
-- Returns {allowed, probe, state, retry_at_ms}.
-- @include breaker_head
settle_time()
if state == 'closed' then return {1, 0, state, 0} end
if state == 'open' then return {0, 0, state, fmt(open_until)} end
if num('probes', 0) > 0 then
  redis.call('HINCRBY', key, 'probes', -1)
  redis.call('HSET', key, 'probe_deadline', fmt(now_ms + probe_lease_ms))
  return {1, 1, state, 0}
end
return {0, 0, state, fmt(math.min(now_ms + tonumber(ARGV[5]), num('probe_deadline', now_ms)))}
