-- A model call failed in a way worth retrying: count it against the step, once per call id,
-- say when the next try is due, and tell the watchers. Returns the step's failed calls so far
-- (-1: no node). A re-sent script (same call id) counts nothing and returns the count.
-- KEYS: tree, node, events, the tree's counted failed calls ; ARGV: node_id, step, error, retry_at, now, call id
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
if redis.call('SADD', KEYS[4], ARGV[6]) == 0 then
  return tonumber(redis.call('HGET', KEYS[2], 'failed_' .. ARGV[2]) or '0')
end
inherit_ttl(KEYS[1], KEYS[4])
local n = redis.call('HINCRBY', KEYS[2], 'failed_' .. ARGV[2], 1)
redis.call('HSET', KEYS[2], 'retry_at', ARGV[4], 'last_error', ARGV[3])
emit(KEYS[1], KEYS[3], 'node', ARGV[1], 'status', redis.call('HGET', KEYS[2], 'status'),
  'failed_calls', tostring(n), 'retry_at', ARGV[4], 'error', string.sub(ARGV[3], 1, 200), 'ts', ARGV[5])
return n
