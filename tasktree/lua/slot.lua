-- Before a model call, for every worker at once: is there a slot for one more call of this
-- model now? Slots expire with their lease (renewed while the call runs); a cap set after a
-- 429 lowers the concurrency until it grows back or expires. A call that finds the
-- concurrency full joins the model's queue (or renews its place there): a call that ends
-- hands its slot to the queue's first live waiter (unslot.lua).
-- KEYS: slots, calls in the last minute, adapted, queue, queue lapse
-- ARGV: token, lease_ms, concurrency (0: none), rpm (0: none), grant key prefix,
--   lapse_ms (a place not renewed in that long is its dead worker's: passed over)
-- Returns {'OK'} or {'WAIT', why, milliseconds worth waiting}.
local now = now_ms()
local token, lease, conc, rpm = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], token) then  -- handed a slot while waiting, or sent again
  if redis.call('ZREM', KEYS[4], token) == 1 then
    redis.call('ZREM', KEYS[5], token)
    redis.call('DEL', ARGV[5] .. token)
  end
  return {'OK'}
end
local limit = model_limit(conc, KEYS[3])
if limit > 0 and redis.call('ZCARD', KEYS[1]) >= limit then
  redis.call('ZADD', KEYS[4], 'NX', now, token)
  redis.call('ZADD', KEYS[5], now + tonumber(ARGV[6]), token)
  redis.call('PEXPIRE', KEYS[4], 60000)
  redis.call('PEXPIRE', KEYS[5], 60000)
  return {'WAIT', 'concurrency', '1000'}
end
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60000)
  if redis.call('ZCARD', KEYS[2]) >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {'WAIT', 'rpm', tostring(math.max(100, tonumber(oldest[2]) + 60000 - now))}
  end
  redis.call('ZADD', KEYS[2], now, token)
  redis.call('PEXPIRE', KEYS[2], 61000)
end
if redis.call('ZREM', KEYS[4], token) == 1 then redis.call('ZREM', KEYS[5], token) end
redis.call('ZADD', KEYS[1], now + lease, token)
redis.call('PEXPIRE', KEYS[1], lease * 4)
return {'OK'}
