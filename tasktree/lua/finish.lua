-- Close a node once (completed, failed, cancelled, budget_exhausted); closing the root closes the tree.
-- KEYS: tree, node, events, claim, runs, nodes, calls
-- ARGV: node_id, status, result, error, now, worker, only_if (required current status, or ''), note, context_keys JSON,
--       token (the run's: the claim of the step this closes, or '' when no run is behind it),
--       node key prefix, runs key prefix (for the retention of the tree's keys when it ends)
-- The run that closes the node also ends there (its token leaves the node's open runs).
local node_id, status, now = ARGV[1], ARGV[2], ARGV[5]
local cur = redis.call('HGET', KEYS[2], 'status')
if not cur or redis.call('EXISTS', KEYS[1]) == 0 then return {'MISSING'} end
if TERMINAL[cur] then return {'ALREADY', cur} end
if ARGV[10] ~= '' then
  local holder = redis.call('GET', KEYS[4])
  if holder and holder ~= ARGV[10] then return {'FENCED', cur} end
end
if ARGV[7] ~= '' and cur ~= ARGV[7] then return {'SKIPPED', cur} end
redis.call('HSET', KEYS[2], 'status', status, 'finished_at', now)
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], 'result', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[2], 'error', ARGV[4]) end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[2], 'worker', ARGV[6]) end
if ARGV[9] ~= '' then redis.call('HSET', KEYS[2], 'context_keys', ARGV[9]) end
if redis.call('HEXISTS', KEYS[2], 'started_at') == 0 then redis.call('HSET', KEYS[2], 'started_at', now) end
if ARGV[8] ~= '' then
  local notes = cjson.decode(redis.call('HGET', KEYS[2], 'notes') or '[]')
  table.insert(notes, ARGV[8])
  redis.call('HSET', KEYS[2], 'notes', cjson.encode(notes))
end
redis.call('HDEL', KEYS[2], 'kept_decide', 'kept_execute', 'kept_synthesize', 'waiting')
for _, step in ipairs({'decide', 'execute', 'synthesize'}) do unreserve(KEYS[1], KEYS[2], step, nil) end
redis.call('DEL', KEYS[4])
if ARGV[10] ~= '' then
  redis.call('SREM', KEYS[5], ARGV[10])
  redis.call('HSET', KEYS[2], 'open_runs', redis.call('SCARD', KEYS[5]))
end
redis.call('HINCRBY', KEYS[1], 'done', 1)
if status ~= 'completed' then redis.call('HINCRBY', KEYS[1], status, 1) end
local fields = {'node', node_id, 'status', status, 'ts', now}
if ARGV[4] ~= '' then table.insert(fields, 'error'); table.insert(fields, string.sub(ARGV[4], 1, 200)) end
if ARGV[8] ~= '' then table.insert(fields, 'note'); table.insert(fields, ARGV[8]) end
emit(KEYS[1], KEYS[3], unpack(fields))
if node_id == '0' then
  local t = redis.call('HMGET', KEYS[1], 'status', 'failed', 'budget_exhausted')
  local final
  if t[1] == 'cancelling' or status == 'cancelled' then final = 'cancelled'
  elseif status == 'failed' then final = 'failed'
  elseif status == 'budget_exhausted' or num(t[3]) > 0 then final = 'budget_exhausted'
  elseif num(t[2]) > 0 then final = 'completed_with_errors'
  else final = 'completed' end
  redis.call('HSET', KEYS[1], 'status', final, 'finished_at', now)
  emit(KEYS[1], KEYS[3], 'tree', final, 'ts', now)
  retain(KEYS[1], KEYS[6], KEYS[3], KEYS[7], ARGV[11], ARGV[12])
end
return {'OK', status}
