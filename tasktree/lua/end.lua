-- A run of a node ended without a crash (returned, retried or replaced): it is no longer
-- open. Applied once per run token. Nothing is written for a node that no longer exists.
-- KEYS: node, runs ; ARGV: run token
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('SREM', KEYS[2], ARGV[1])
local runs = redis.call('SCARD', KEYS[2])
redis.call('HSET', KEYS[1], 'open_runs', runs)
return runs
