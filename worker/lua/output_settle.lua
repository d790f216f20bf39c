-- output_settle: record one try of an output copy, fenced by the claim number that took it.
-- copied: the held event and callback go out with the stored location (unless a given-up try
--   already published them), the record learns the location and the verification, the charge is
--   corrected to the verified duration, and the entry is gone;
-- retry: the entry is due again at the backoff time;
-- failed: given up (the copy window passed): the held event and callback go out with fal's URL and
--   output_copy=failed, the entry waits in the failed ZSET for `reframe outputs retry`.
-- KEYS: 1 outputs pending ZSET, 2 the entry HASH, 3 outputs failed ZSET, 4 the job's record,
--       5 events STREAM, 6 callback outbox ZSET, 7 the callback's outbox entry HASH,
--       8, 9 the day and month budget keys the settlement charged, 10, 11 the same of the job's
--       tenant (any keys when it has none), 12 the cost ledger STREAM, 13 outputs since ZSET.
-- ARGV: 1 event id, 2 options (JSON):
--   claim         the claim number output_take gave (else refused: 'LOST')
--   outcome       'copied' | 'retry' | 'failed'
--   due_ms        next try (retry); failed_ttl_ms: how long a given-up entry is kept
--   error         what went wrong (retry, failed)
--   set           {field: value} for the record (same life only)
--   event         {field: value} added to the held event; cb_tail: JSON members added to the body
--   correction    (copied) {micro, billed_s}: charge delta from the verified duration (0: none)
-- Returns {1, stream id or ''} or {0, 'GONE' | 'LOST'}.
-- @include now
local opt = cjson.decode(ARGV[2])
-- JSON null decodes to a userdata: absent options are nil here, checked before any write
local function tbl(x) if type(x) == 'table' then return x end return nil end
local set_fields, ev_fields, correction = tbl(opt.set), tbl(opt.event), tbl(opt.correction)
local id, entry = ARGV[1], KEYS[2]
if redis.call('EXISTS', entry) == 0 then
  redis.call('ZREM', KEYS[1], id)
  return {0, 'GONE'}
end
if tostring(redis.call('HGET', entry, 'claims')) ~= tostring(opt.claim) then return {0, 'LOST'} end
local function get(f) return redis.call('HGET', entry, f) or '' end
local same_life = redis.call('HGET', KEYS[4], 'event_id') == id
local function set_record(fields)
  if not same_life or not fields then return end
  local kv = {}
  for k, v in pairs(fields) do kv[#kv + 1] = k; kv[#kv + 1] = v end
  if #kv > 0 then redis.call('HSET', KEYS[4], unpack(kv)) end
end
if opt.outcome == 'retry' then
  redis.call('HINCRBY', entry, 'attempts', 1)
  redis.call('HSET', entry, 'last_error', opt.error or '', 'last_try_ms', now_ms)
  redis.call('ZADD', KEYS[1], tonumber(opt.due_ms), id)
  set_record(set_fields)
  return {1, ''}
end
local stream_id = ''
if get('published') ~= '1' then
  local ev = cjson.decode(get('event'))
  if ev_fields then
    for k, v in pairs(ev_fields) do ev[#ev + 1] = k; ev[#ev + 1] = v end
  end
  stream_id = redis.call('XADD', KEYS[5], '*', unpack(ev))
  local url, body = get('cb_url'), get('cb_body')
  if url ~= '' then
    if type(opt.cb_tail) == 'string' and opt.cb_tail ~= '' then body = string.sub(body, 1, -2) .. ',' .. opt.cb_tail .. '}' end
    redis.call('HSET', KEYS[7], 'event_id', id, 'job_id', get('job_id'), 'url', url, 'body', body,
      'created_at_ms', now_ms, 'attempts', 0, 'tenant', get('tenant'))
    redis.call('ZADD', KEYS[6], now_ms, id)
  end
  redis.call('HSET', entry, 'published', '1', 'published_at_ms', now_ms)
end
set_record(set_fields)
if opt.outcome == 'copied' then
  local delta = tonumber(correction and correction.micro or 0) or 0
  if delta ~= 0 and get('res_day') ~= '' then
    local tenant = get('tenant')
    local touched = {KEYS[8], KEYS[9]}
    if tenant ~= '' then touched[3], touched[4] = KEYS[10], KEYS[11] end
    for _, k in ipairs(touched) do
      if redis.call('HINCRBY', k, 'spent', delta) < 0 then redis.call('HSET', k, 'spent', 0) end
    end
    redis.call('XADD', KEYS[12], '*', 'job_id', get('job_id'), 'attempt', get('attempt'), 'tenant', tenant,
      'request_id', get('request_id'), 'billed_s', tostring(correction.billed_s or ''),
      'micro', string.format('%d', delta), 'kind', 'correction', 'at_ms', now_ms)
  end
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZREM', KEYS[13], id)
  redis.call('DEL', entry)
else
  redis.call('HINCRBY', entry, 'attempts', 1)
  redis.call('HSET', entry, 'last_error', opt.error or '', 'last_try_ms', now_ms, 'failed_at_ms', now_ms)
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[13], id)
  redis.call('ZADD', KEYS[3], now_ms, id)
  redis.call('PEXPIRE', entry, tonumber(opt.failed_ttl_ms))
end
return {1, stream_id}
