-- retry_budget_apply: add (a first attempt) or spend (a retry) milli-tokens of the retry budget.
-- KEYS: 1 the bucket (STRING, milli-tokens).
-- ARGV: 1 delta (milli, may be negative), 2 initial, 3 max, 4 idle ttl ms,
--       5 require (milli-tokens needed before a negative delta applies).
-- Returns {applied (1/0), tokens after}.
local tokens = tonumber(redis.call('GET', KEYS[1])) or tonumber(ARGV[2])
local delta, need = tonumber(ARGV[1]), tonumber(ARGV[5])
if tokens < need then return {0, tokens} end
tokens = math.min(tonumber(ARGV[3]), tokens + delta)
redis.call('SET', KEYS[1], string.format('%.0f', tokens), 'PX', ARGV[4])
return {1, tokens}
