-- Continue an interrupted tree: it runs again on the given queues; every open node loses the
-- claims and run counts of the attempts that were abandoned, and keeps everything stored.
-- KEYS: tree, events, nodes, then per node: node, runs, claim decide, claim execute, claim synthesize
-- ARGV: now, node queue, synthesis queue
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'MISSING'} end
if status ~= 'interrupted' then return {'NOOP', status} end
if redis.call('LLEN', KEYS[3]) * 5 ~= #KEYS - 3 then return {'RETRY'} end
local open = 0
for i = 4, #KEYS, 5 do
  local cur = redis.call('HGET', KEYS[i], 'status')
  if cur and not TERMINAL[cur] then
    open = open + 1
    redis.call('HSET', KEYS[i], 'open_runs', 0)
    redis.call('HDEL', KEYS[i], 'retry_at')
    redis.call('DEL', KEYS[i + 1], KEYS[i + 2], KEYS[i + 3], KEYS[i + 4])
  end
end
redis.call('HSET', KEYS[1], 'status', 'running', 'queue', ARGV[2], 'synth_queue', ARGV[3])
redis.call('HDEL', KEYS[1], 'interrupted_at')
emit(KEYS[1], KEYS[2], 'tree', 'running', 'note', 'resumed: ' .. open .. ' open node(s)', 'ts', ARGV[1])
return {'OK', tostring(open)}
