-- A run of a node ended without a crash (returned, retried or replaced): it is no longer
-- open. Applied once per run token. Nothing is written for a node that no longer exists.
-- KEYS: node ; ARGV: run token
local n = redis.call('HMGET', KEYS[1], 'runs', 'status')
if not n[2] then return -1 end
local runs, open = runs_with(n[1], ARGV[1], false)
redis.call('HSET', KEYS[1], 'runs', runs, 'open_runs', open)
return open
