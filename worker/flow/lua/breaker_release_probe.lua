-- breaker_release_probe: give back an unused HALF_OPEN probe token.
-- KEYS: 1 the breaker HASH (see breaker_head).
-- ARGV: 1..4 as breaker_head. Returns the state.
-- @include breaker_head
settle_time()
if state == 'half_open' and num('probes', 0) < probes_max then
  redis.call('HINCRBY', key, 'probes', 1)
end
return state
