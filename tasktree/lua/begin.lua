-- Start of a task run: the tree, the node, and how many runs of it have not ended. Applied
-- once per run token, so a script sent again after a timeout counts no second run.
-- Nothing is written for a node that does not exist. With a live index and a member, the
-- run's message is listed there (scored now) while its node is open: from its first round
-- trip, a run whose worker dies is found by the sweeper.
-- KEYS: tree, node[, live index] ; ARGV: run token[, live member]
local tree = redis.call('HGETALL', KEYS[1])
local node = redis.call('HGETALL', KEYS[2])
if #tree == 0 or #node == 0 then return {{}, {}, 0} end
if KEYS[3] and not TERMINAL[field_of(node, 'status')] then
  redis.call('ZADD', KEYS[3], now_ms(), ARGV[2])
end
local runs, open, known = runs_with(field_of(node, 'runs'), ARGV[1], true)
local set = {'runs', runs, 'open_runs', open}
if not known then put(set, 'deliveries', num(field_of(node, 'deliveries')) + 1) end
redis.call('HSET', KEYS[2], unpack(set))
-- The node as it is now: the reply read before the write, with the written fields.
for i = 1, #set, 2 do
  local found = false
  for j = 1, #node, 2 do
    if node[j] == set[i] then node[j + 1], found = tostring(set[i + 1]), true end
  end
  if not found then table.insert(node, set[i]); table.insert(node, tostring(set[i + 1])) end
end
return {tree, node, open}
