-- Mark a running tree as cancelling; queued nodes are then closed by store.cancel.
-- KEYS: tree, events ; ARGV: now
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'MISSING'} end
if status ~= 'running' then return {'NOOP', status} end
redis.call('HSET', KEYS[1], 'status', 'cancelling')
emit(KEYS[1], KEYS[2], 'tree', 'cancelling', 'ts', ARGV[1])
return {'OK', 'cancelling'}
