-- A node closed outside its parent's chord (its message was re-sent): is the parent's
-- synthesis now due, and is this the one run that sends it? Atomic: one sibling sends it.
-- KEYS: tree, parent node, marker, child_1 .. child_n ; ARGV: marker lifetime (ms)
-- Returns the tree's synthesis queue to send it to ('-' if it names none), or '' when not
-- due or not this run's to send.
if redis.call('HGET', KEYS[2], 'status') ~= 'delegated' then return '' end
for i = 4, #KEYS do
  local status = redis.call('HGET', KEYS[i], 'status')
  if not status or not TERMINAL[status] then return '' end
end
if not redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[1]) then return '' end
return redis.call('HGET', KEYS[1], 'synth_queue') or '-'
