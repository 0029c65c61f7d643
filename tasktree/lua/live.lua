-- Heartbeat of the messages a worker process holds: score each member by Redis's clock (ms),
-- now (listing it if the sweeper took it while the process was frozen: it still holds it).
-- A member whose node has closed (or is gone) is taken off instead: its run has nothing left
-- to do, and no beat keeps it listed (Celery can keep a stale request after a lost broker
-- connection).
-- Without the nodes' keys (a burst just received), every member is listed unchecked: a
-- member whose node had closed is taken off by the next beat, which no longer holds it.
-- KEYS: live index[, then the node of each member] ; ARGV: member ...
local now = now_ms()
local add, gone = {}, {}
local check = #KEYS > 1
for i = 1, #ARGV do
  local status = check and redis.call('HGET', KEYS[i + 1], 'status')
  if not check or (status and not TERMINAL[status]) then
    table.insert(add, now); table.insert(add, ARGV[i])
  else
    table.insert(gone, ARGV[i])
  end
end
call_chunked('ZADD', KEYS[1], add)  -- pairs: 4000 is even
call_chunked('ZREM', KEYS[1], gone)
return #add / 2
