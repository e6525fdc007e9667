-- A key's quota counters, from the books, unless another replica put them here first.
-- KEYS: 1 key quotas; ARGV: 1-3 requests, tokens, images, 4 a new generation
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'requests', ARGV[1], 'tokens', ARGV[2], 'images', ARGV[3],
    'generation', ARGV[4])
end
return 0
