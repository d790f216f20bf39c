-- events_trim: trim the result stream below what every consumer group still needs, and past a hard
-- ceiling only if it must. A group still needs its pending (delivered, unacknowledged) entries and
-- everything after its last-delivered id.
-- KEYS: 1 events STREAM. ARGV: 1 hard ceiling (entries), 2 keep (entries kept even when no group
-- needs them, for late XREAD waiters).
-- Returns {entries trimmed below the groups, entries trimmed past the ceiling that a group had not
-- read yet}.
local stream = KEYS[1]
local ceiling, keep = tonumber(ARGV[1]), tonumber(ARGV[2])
local len0 = redis.call('XLEN', stream)
-- nothing may go while the stream holds no more than `keep` (the newest stay whatever the groups
-- need) and is under its ceiling: return before reading the groups
if len0 == 0 or (len0 <= keep and len0 <= ceiling) then return {0, 0} end
local function less(a, b)
  local a1, a2 = string.match(a, '^(%d+)-(%d+)$')
  local b1, b2 = string.match(b, '^(%d+)-(%d+)$')
  a1, a2, b1, b2 = tonumber(a1), tonumber(a2), tonumber(b1), tonumber(b2)
  return a1 < b1 or (a1 == b1 and a2 < b2)
end
local min_needed = nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  local cut = nil
  local pending = redis.call('XPENDING', stream, info['name'])
  if pending[1] > 0 then
    cut = pending[2]  -- its oldest delivered-but-unacknowledged entry
  else
    local after = redis.call('XRANGE', stream, '(' .. info['last-delivered-id'], '+', 'COUNT', 1)
    if #after > 0 then cut = after[1][1] end  -- its first unread entry
  end
  if cut ~= nil and (min_needed == nil or less(cut, min_needed)) then min_needed = cut end
end
-- MINID keeps ids >= the threshold: the lower of what a group needs and the newest `keep` entries
local threshold = min_needed
if keep > 0 then
  -- the oldest of the newest `keep` entries, read from the old end: O(entries past `keep`), which
  -- the periodic trim keeps small, instead of O(keep) from the new end
  local oldest = redis.call('XRANGE', stream, '-', '+', 'COUNT', math.max(1, len0 - keep + 1))
  local floor = oldest[#oldest][1]
  if threshold == nil or less(floor, threshold) then threshold = floor end
end
local trimmed
if threshold == nil then
  trimmed = redis.call('XTRIM', stream, 'MAXLEN', 0)
else
  trimmed = redis.call('XTRIM', stream, 'MINID', threshold)
end
-- past the hard ceiling the oldest entries go whatever the groups need; count only those some group
-- had not read yet (at or after min_needed), which is what the alert is about
local over = 0
local len = redis.call('XLEN', stream)
if len > ceiling then
  local cut = len - ceiling
  if min_needed ~= nil then
    local before = redis.call('XRANGE', stream, '-', '(' .. min_needed, 'COUNT', cut)
    over = cut - #before
  end
  redis.call('XTRIM', stream, 'MAXLEN', ceiling)
end
return {trimmed, over}
