-- One call's admission, all or nothing: the key's quotas (requests, tokens, images counted
-- so far, calls in flight included), then calls in flight and per-minute limits (GCRA,
-- one "theoretical arrival time" in microseconds per limit) for the key and its user.
-- KEYS: 1 key quotas (hash), 2 key rpm, 3 key tpm, 4 key in flight (zset),
--       5 user rpm, 6 user tpm, 7 user in flight (zset)
-- ARGV: 1-3 request, token, image quota (-1: none), 4 tokens, 5 images,
--       6-8 key rpm, tpm, concurrency (0: none), 9-11 the user's, 12 call id,
--       13 how long a call may hold a slot (ms), 14 budget in nano-units (-1: none),
--       15 the call's worst cost
-- Returns {0, generation} admitted; {1} the key's quotas are not here yet (the caller loads them);
-- {2, what, limit} a quota (4: the budget); {3, scope, kind, limit, wait us (-1: never)} a limit.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = 60000000
local tokens, images = tonumber(ARGV[4]), tonumber(ARGV[5])
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {1}
end
local spend = tonumber(ARGV[15])
local used = redis.call('HMGET', KEYS[1], 'requests', 'tokens', 'images', 'cost')
local quotas = {{1, 1, 1}, {2, tokens, 2}, {3, images, 3}, {4, spend, 14}}
for _, q in ipairs(quotas) do
  local limit = tonumber(ARGV[q[3]])
  if limit >= 0 and q[2] > 0 and (tonumber(used[q[1]]) or 0) + q[2] > limit then
    return {2, q[1], limit}
  end
end
local function slots_free(zset, cap)
  if cap <= 0 then return true end
  redis.call('ZREMRANGEBYSCORE', zset, '-inf', math.floor(now / 1000))
  return redis.call('ZCARD', zset) < cap
end
if not slots_free(KEYS[4], tonumber(ARGV[8])) then return {3, 1, 3, tonumber(ARGV[8]), 1000000} end
if not slots_free(KEYS[7], tonumber(ARGV[11])) then return {3, 2, 3, tonumber(ARGV[11]), 1000000} end
local function cost(limit, amount)
  return math.ceil(amount * window / limit)
end
local function tat_of(key)
  local tat = tonumber(redis.call('GET', key)) or 0
  if tat < now then tat = now end
  return tat
end
-- {scope, kind, key, limit, amount}
local windows = {
  {1, 1, KEYS[2], tonumber(ARGV[6]), 1}, {1, 2, KEYS[3], tonumber(ARGV[7]), tokens},
  {2, 1, KEYS[5], tonumber(ARGV[9]), 1}, {2, 2, KEYS[6], tonumber(ARGV[10]), tokens},
}
for _, w in ipairs(windows) do
  local limit, amount = w[4], w[5]
  if limit > 0 then
    if amount > limit then return {3, w[1], w[2], limit, -1} end
    local over = tat_of(w[3]) + cost(limit, amount) - now - window
    if over > 0 then return {3, w[1], w[2], limit, over} end
  end
end
for _, w in ipairs(windows) do
  if w[4] > 0 then
    local tat = tat_of(w[3]) + cost(w[4], w[5])
    redis.call('SET', w[3], string.format('%d', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
  end
end
local expiry = math.floor(now / 1000) + tonumber(ARGV[13])
if tonumber(ARGV[8]) > 0 then redis.call('ZADD', KEYS[4], expiry, ARGV[12]) end
if tonumber(ARGV[11]) > 0 then redis.call('ZADD', KEYS[7], expiry, ARGV[12]) end
redis.call('HINCRBY', KEYS[1], 'requests', 1)
redis.call('HINCRBY', KEYS[1], 'tokens', tokens)
redis.call('HINCRBY', KEYS[1], 'images', images)
redis.call('HINCRBY', KEYS[1], 'cost', spend)
return {0, redis.call('HGET', KEYS[1], 'generation')}
