-- finish: end a job's life exactly once: terminal state, resources freed, result event, callback
-- work in the outbox and the record's expiry, all in one atomic step (the outbox pattern).
-- KEYS: 1..16 as job_head; 17 events STREAM, 18 dlq ZSET, 19 outbox ZSET, 20 outbox entry HASH,
--       21 the job's idempotency claim (any key when it has none): it expires with the record,
--       22 outputs pending ZSET, 23 the output copy entry HASH, 24 outputs since ZSET (any keys when
--       no copy is asked for).
-- ARGV: 1 job id, 2 options (JSON): the fence and slot/budget options of job_head, and
--   to            SUCCEEDED | FAILED | CANCELLED
--   event_id      "<job id>.<life>": must match the record's life (else refused as 'STALE')
--   retention_ms  record expiry; dead_letter (bool) and dlq_retention_ms for dead letters
--   set, del      record fields
--   event         {field: value} extra fields of the stream event
--   body_tail     the callback body after the fields this script writes: JSON members and the
--                 closing brace, e.g. '"video":{...},"cost_usd":0.18,"error":null}'
--   copy          (SUCCEEDED only) {field: value} of an output copy entry: the event and the
--                 callback are held in the entry, not published; the copier publishes them with
--                 the stored location once the copy is done or given up (worker/lua/output_settle.lua)
-- Returns {1, now_ms, stream id, admitted ids...} or {0, state} (nothing changed).
-- @include job_head
local refused = fence() or budget_keys_missing()
if refused then return {0, refused} end
local life = tonumber(redis.call('HGET', job_key, 'replays') or '0') + 1
if opt.event_id ~= job_id .. '.' .. life then return {0, 'STALE'} end
redis.call('HSET', job_key, 'state', opt.to, 'ts_' .. opt.to, now_ms, 'updated_at_ms', now_ms,
  'finished_at_ms', now_ms, 'event_id', opt.event_id, 'gate_until_ms', 0)
write_fields()
redis.call('ZREM', delayed, job_id)
redis.call('ZREM', blocked, job_id)
redis.call('ZREM', track, job_id)
redis.call('HDEL', track_owner, job_id)
-- the periods a settlement charges (a copy's verified duration corrects the charge in them)
local res_day, res_month = '', ''
local res_rec = redis.call('HGET', reservations, job_id)
if res_rec then
  local _est
  _est, res_day, res_month = parse_reservation(res_rec)
end
local admitted = free_resources()
local ttl_ms = opt.retention_ms
if opt.dead_letter then
  redis.call('ZADD', KEYS[18], now_ms, job_id)
  redis.call('HSET', job_key, 'dead_letter', '1')
  ttl_ms = opt.dlq_retention_ms
end
redis.call('PEXPIRE', job_key, ttl_ms)
-- an idempotency claim answers retries exactly as long as the record it points to exists
if (redis.call('HGET', job_key, 'idempotency_key') or '') ~= '' then redis.call('PEXPIRE', KEYS[21], ttl_ms) end
local function field(f) return redis.call('HGET', job_key, f) or '' end
local metadata = field('metadata')
if metadata == '' then metadata = '{}' end
local ev = {'v', '2', 'event_id', opt.event_id, 'job_id', job_id, 'state', opt.to,
            'finished_at_ms', tostring(now_ms), 'attempts', field('attempts'), 'attempt', field('attempt'),
            'life', tostring(life), 'priority', field('priority'), 'created_at_ms', field('created_at_ms'),
            'metadata', metadata}
if opt.event then
  for k, v in pairs(opt.event) do ev[#ev + 1] = k; ev[#ev + 1] = v end
end
local url = field('callback_url')
local body = ''
if url ~= '' then
  body = '{"v":2,"event_id":' .. cjson.encode(opt.event_id) .. ',"job_id":' .. cjson.encode(job_id)
    .. ',"state":' .. cjson.encode(opt.to) .. ',"finished_at_ms":' .. string.format('%d', now_ms)
    .. ',"life":' .. life .. ',"metadata":' .. metadata .. ',' .. opt.body_tail
end
local stream_id = ''
if type(opt.copy) == 'table' and opt.to == 'SUCCEEDED' then
  -- the outbox pattern once more: the copy is work written with the terminal state, and the event
  -- and callback wait in its entry so that they carry the durable location
  local entry = {'event_id', opt.event_id, 'job_id', job_id, 'tenant', field('tenant'),
    'event', cjson.encode(ev), 'cb_url', url, 'cb_body', body, 'created_at_ms', now_ms,
    'attempts', 0, 'claims', 0, 'window_start_ms', now_ms, 'res_day', res_day, 'res_month', res_month,
    'attempt', field('attempt'), 'request_id', field('fal_request_id')}
  for k, v in pairs(opt.copy) do entry[#entry + 1] = k; entry[#entry + 1] = v end
  redis.call('DEL', KEYS[23])
  redis.call('HSET', KEYS[23], unpack(entry))
  redis.call('ZADD', KEYS[22], now_ms, opt.event_id)
  redis.call('ZADD', KEYS[24], now_ms, opt.event_id)
  redis.call('HSET', job_key, 'output_copy', 'pending')
else
  -- no MAXLEN here: the housekeeper trims below the slowest consumer group (events_trim.lua)
  stream_id = redis.call('XADD', KEYS[17], '*', unpack(ev))
  if url ~= '' then
    redis.call('HSET', KEYS[20], 'event_id', opt.event_id, 'job_id', job_id, 'url', url, 'body', body,
      'created_at_ms', now_ms, 'attempts', 0, 'tenant', field('tenant'))
    redis.call('ZADD', KEYS[19], now_ms, opt.event_id)
  end
end
local out = {1, now_ms, stream_id}
for _, id in ipairs(admitted) do out[#out + 1] = id end
return out
