-- rate_probe_done: the probe's answer arrived; on success let the others go now.
-- KEYS: 1 probe STRING. ARGV: 1 the probe's mark ('inflight:<us>'), 2 ok (1|0).
-- Returns 1 if the mark was released, else 0 (not ok: the others wait out the spacing; a newer
-- pause or probe is never touched).
if ARGV[2] == '1' and redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
