-- Write a tree and its queued root, once: sent again after a timeout, it changes nothing.
-- KEYS: tree, root node, nodes, events ; ARGV: tree fields JSON, root fields JSON, now
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i, key in ipairs({KEYS[1], KEYS[2]}) do  -- each hash in one HSET
  local set = {}
  for field, value in pairs(cjson.decode(ARGV[i])) do put(set, field, tostring(value)) end
  redis.call('HSET', key, unpack(set))
end
redis.call('RPUSH', KEYS[3], '0')
emit(KEYS[1], KEYS[4], 'tree', 'running', 'ts', ARGV[3])
emit(KEYS[1], KEYS[4], 'node', '0', 'status', 'queued', 'ts', ARGV[3])
return 1
