-- breaker_force_open: open until a time without counting a trip; extends, never shortens.
-- KEYS: 1 the breaker HASH (see breaker_head).
-- ARGV: 1..4 as breaker_head; 5 open until (ms). Returns the open-until time (ms).
-- @include breaker_head
local until_ms = tonumber(ARGV[5])
if state == 'open' and open_until > until_ms then until_ms = open_until end
if until_ms > now_ms then
  redis.call('HSET', key, 'state', 'open', 'open_until', fmt(until_ms), 'probes', 0)
end
return fmt(until_ms)
