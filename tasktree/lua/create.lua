-- Write a tree and its queued root, once: sent again after a timeout, it changes nothing.
-- KEYS: tree, root node, nodes, events ; ARGV: tree fields JSON, root fields JSON, now
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for field, value in pairs(cjson.decode(ARGV[1])) do redis.call('HSET', KEYS[1], field, tostring(value)) end
for field, value in pairs(cjson.decode(ARGV[2])) do redis.call('HSET', KEYS[2], field, tostring(value)) end
redis.call('RPUSH', KEYS[3], '0')
emit(KEYS[1], KEYS[4], 'tree', 'running', 'ts', ARGV[3])
emit(KEYS[1], KEYS[4], 'node', '0', 'status', 'queued', 'ts', ARGV[3])
return 1
