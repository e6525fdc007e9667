-- A key's quota counters, from the books, unless another replica put them here first.
-- A key with a period has counters of its own for each period, gone a day after it ends.
-- KEYS: 1 key quotas; ARGV: 1-3 requests, tokens, images, 4 a new generation, 5 cost,
--       6 when the counters may go (seconds since the epoch; 0: never)
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'requests', ARGV[1], 'tokens', ARGV[2], 'images', ARGV[3],
    'generation', ARGV[4], 'cost', ARGV[5])
  if tonumber(ARGV[6]) > 0 then redis.call('EXPIREAT', KEYS[1], ARGV[6]) end
end
return 0
