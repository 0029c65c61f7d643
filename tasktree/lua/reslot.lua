-- Heartbeat of model calls in flight: extend each slot still listed by a lease from now.
-- KEYS: slots ; ARGV: lease_ms, token ...
local now = now_ms()
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i])
  end
end
return 0
