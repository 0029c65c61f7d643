-- Start of a task run: the tree, the node, and how many runs of it have not ended.
-- Nothing is written for a node that does not exist.
-- KEYS: tree, node
if redis.call('EXISTS', KEYS[2]) == 0 or redis.call('EXISTS', KEYS[1]) == 0 then
  return {{}, {}, 0}
end
local runs = redis.call('HINCRBY', KEYS[2], 'open_runs', 1)
redis.call('HINCRBY', KEYS[2], 'deliveries', 1)
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]), runs}
