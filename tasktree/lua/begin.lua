-- Start of a task run: the tree, the node, and how many runs of it have not ended. Applied
-- once per run token, so a script sent again after a timeout counts no second run.
-- Nothing is written for a node that does not exist.
-- KEYS: tree, node, runs ; ARGV: run token
if redis.call('EXISTS', KEYS[2]) == 0 or redis.call('EXISTS', KEYS[1]) == 0 then
  return {{}, {}, 0}
end
if redis.call('SADD', KEYS[3], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'deliveries', 1)
  inherit_ttl(KEYS[1], KEYS[3])
end
local runs = redis.call('SCARD', KEYS[3])
redis.call('HSET', KEYS[2], 'open_runs', runs)
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]), runs}
