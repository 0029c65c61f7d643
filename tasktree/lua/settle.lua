-- Close a cancelling tree that nobody is left to finish: every open node becomes cancelled
-- (what finished nodes stored is kept) and the tree ends cancelled.
-- KEYS: tree, events, nodes, calls, node_1 .. node_n ; ARGV: now, note, node key prefix
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'MISSING'} end
if status ~= 'cancelling' and status ~= 'interrupted' then return {'NOOP', status} end
if redis.call('LLEN', KEYS[3]) ~= #KEYS - 4 then return {'RETRY'} end
local now = ARGV[1]
for i = 5, #KEYS do
  local cur = redis.call('HGET', KEYS[i], 'status')
  if cur and not TERMINAL[cur] then
    local id = redis.call('HGET', KEYS[i], 'id')
    local notes = cjson.decode(redis.call('HGET', KEYS[i], 'notes') or '[]')
    if type(notes) ~= 'table' or notes[1] == nil then notes = {} end
    table.insert(notes, ARGV[2])
    redis.call('HSET', KEYS[i], 'status', 'cancelled', 'finished_at', now, 'notes', cjson.encode(notes))
    redis.call('HINCRBY', KEYS[1], 'done', 1)
    redis.call('HINCRBY', KEYS[1], 'cancelled', 1)
    emit(KEYS[1], KEYS[2], 'node', id, 'status', 'cancelled', 'note', ARGV[2], 'ts', now)
  end
end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', now)
emit(KEYS[1], KEYS[2], 'tree', 'cancelled', 'ts', now)
retain(KEYS[1], KEYS[3], KEYS[2], KEYS[4], ARGV[3])
return {'OK', 'cancelled'}
