-- One call's settlement: its reservation becomes what it was charged, its slots are
-- freed, its per-minute tokens corrected (and its request given back if it was withdrawn).
-- KEYS: 1 key quotas, 2 key rpm, 3 key tpm, 4 key in flight, 5 user rpm, 6 user tpm,
--       7 user in flight
-- ARGV: 1 request delta (0 or -1), 2 token delta, 3 image delta, 4 call id,
--       5 key rpm, 6 key tpm, 7 user rpm, 8 user tpm, 9 generation, 10 withdrawn (1/0),
--       11 cost delta (nano-units)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = 60000000
-- Counters rebuilt since the call was admitted (a Redis restart) never had its reservation.
if redis.call('HGET', KEYS[1], 'generation') == ARGV[9] then
  redis.call('HINCRBY', KEYS[1], 'requests', ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'tokens', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'images', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'cost', ARGV[11])
end
redis.call('ZREM', KEYS[4], ARGV[4])
redis.call('ZREM', KEYS[7], ARGV[4])
local function adjust(key, limit, delta)
  if limit <= 0 or delta == 0 then return end
  local tat = tonumber(redis.call('GET', key)) or now
  local shift = math.ceil(math.abs(delta) * window / limit)
  if delta > 0 then
    tat = math.max(tat, now) + shift
  else
    tat = math.max(tat - shift, now)
  end
  redis.call('SET', key, string.format('%d', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
end
local token_delta = tonumber(ARGV[2])
adjust(KEYS[3], tonumber(ARGV[6]), token_delta)
adjust(KEYS[6], tonumber(ARGV[8]), token_delta)
if ARGV[10] == '1' then
  adjust(KEYS[2], tonumber(ARGV[5]), -1)
  adjust(KEYS[5], tonumber(ARGV[7]), -1)
end
return 0
