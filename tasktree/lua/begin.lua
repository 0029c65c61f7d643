-- Start of a task run: the tree, the node, and how many runs of it have not ended. Applied
-- once per run token, so a script sent again after a timeout counts no second run.
-- Nothing is written for a node that does not exist.
-- KEYS: tree, node, runs ; ARGV: run token
local tree = redis.call('HGETALL', KEYS[1])
local n = fields(KEYS[2], 'deliveries', 'status')
if #tree == 0 or not n.status then return {{}, {}, 0} end
local set = {}
if redis.call('SADD', KEYS[3], ARGV[1]) == 1 then
  set = {'deliveries', num(n.deliveries) + 1}
  inherit_ttl(KEYS[1], KEYS[3], field_of(tree, 'status'))
end
local runs = redis.call('SCARD', KEYS[3])
table.insert(set, 'open_runs'); table.insert(set, runs)
redis.call('HSET', KEYS[2], unpack(set))
return {tree, redis.call('HGETALL', KEYS[2]), runs}
