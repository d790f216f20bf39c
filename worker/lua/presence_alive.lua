-- presence_alive: the processes that beat within a window, by Redis TIME.
-- KEYS[1] = P:procs        (ZSET process id -> last beat ms)
-- ARGV[1] = window in ms
-- ARGV[2] = a process id to check, or '' for every live process
-- return  = {now_ms, id1, beat1_ms, id2, beat2_ms, ...} (only the checked id when ARGV[2] is set)
-- @include now
local since = now_ms - tonumber(ARGV[1])
local out = {now_ms}
if ARGV[2] ~= '' then
  local score = redis.call('ZSCORE', KEYS[1], ARGV[2])
  if score and tonumber(score) >= since then
    out[2] = ARGV[2]
    out[3] = math.floor(tonumber(score))
  end
  return out
end
local rows = redis.call('ZRANGEBYSCORE', KEYS[1], since, '+inf', 'WITHSCORES')
for i = 1, #rows, 2 do
  out[#out + 1] = rows[i]
  out[#out + 1] = math.floor(tonumber(rows[i + 1]))
end
return out
