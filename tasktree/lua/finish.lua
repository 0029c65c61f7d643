-- Close a node once (completed, failed, cancelled, budget_exhausted); closing the root closes the tree.
-- KEYS: tree, node, events, claim
-- ARGV: node_id, status, result, error, now, worker, only_if (required current status, or ''), note, context_keys JSON
local node_id, status, now = ARGV[1], ARGV[2], ARGV[5]
local cur = redis.call('HGET', KEYS[2], 'status')
if not cur then return {'MISSING'} end
if TERMINAL[cur] then return {'ALREADY', cur} end
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
redis.call('DEL', KEYS[4])
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
end
return {'OK', status}
