-- A node's call waits for its model's shared limit: say so once (the live view shows it) until
-- the call is made. KEYS: tree, node, events ; ARGV: node_id, why, now
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
if redis.call('HSETNX', KEYS[2], 'waiting', ARGV[2]) == 0 then return 0 end
emit(KEYS[1], KEYS[3], 'node', ARGV[1], 'status', redis.call('HGET', KEYS[2], 'status'),
  'note', ARGV[2], 'ts', ARGV[3])
return 1
