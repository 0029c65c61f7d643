-- Stop all work on a running tree and keep everything it stored: nobody works on it until
-- it is resumed, and every message of it that a worker still takes is dropped.
-- KEYS: tree, events ; ARGV: now, note ('' or why: "paused by user")
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'MISSING'} end
if status ~= 'running' then return {'NOOP', status} end
redis.call('HSET', KEYS[1], 'status', 'interrupted', 'interrupted_at', ARGV[1])
if ARGV[2] and ARGV[2] ~= '' then
  emit(KEYS[1], KEYS[2], 'tree', 'interrupted', 'note', ARGV[2], 'ts', ARGV[1])
else
  emit(KEYS[1], KEYS[2], 'tree', 'interrupted', 'ts', ARGV[1])
end
return {'OK', 'interrupted'}
