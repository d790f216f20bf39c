-- output_take: one claimed output copy becomes this copier's: the entry's `claims` grows by one and
-- that number fences the settlement (output_settle.lua), so a copier whose lease ran out and was
-- claimed again can only discover that it lost.
-- KEYS: 1 outputs pending ZSET, 2 the entry HASH. ARGV: 1 event id.
-- Returns {claim number, entry fields and values...}, or {0} when the entry is gone (dropped).
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return {0}
end
local claim = redis.call('HINCRBY', KEYS[2], 'claims', 1)
local out = {claim}
for _, v in ipairs(redis.call('HGETALL', KEYS[2])) do out[#out + 1] = v end
return out
