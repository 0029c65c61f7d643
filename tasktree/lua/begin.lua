-- Start of a task run: the tree, the node, and how many runs of it have not ended. Applied
-- once per run token, so a script sent again after a timeout counts no second run.
-- Nothing is written for a node that does not exist. With a live index and a member, the
-- run's message is listed there (scored now) while its node is open: from its first round
-- trip, a run whose worker dies is found by the sweeper.
-- KEYS: tree, node[, live index] ; ARGV: run token[, live member]
-- Of the tree, the fields a run reads (runner.py, synthesis.py): not its task text, which
-- can be long, or its counters.
local RUN_READS = {'max_depth', 'max_children', 'single_call', 'model', 'queue', 'synth_queue',
  'max_cost', 'max_tokens', 'on_child_failure', 'status'}
local values = redis.call('HMGET', KEYS[1], unpack(RUN_READS))
local tree = {}
for i, f in ipairs(RUN_READS) do
  if values[i] then table.insert(tree, f); table.insert(tree, values[i]) end
end
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
