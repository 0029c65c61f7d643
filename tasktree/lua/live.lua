-- Heartbeat of the messages a worker process holds: score each member by Redis's clock (ms),
-- now (listing it if the sweeper took it while the process was frozen: it still holds it).
-- KEYS: live index ; ARGV: member ...
local now = now_ms()
for i = 1, #ARGV do redis.call('ZADD', KEYS[1], now, ARGV[i]) end
return #ARGV
