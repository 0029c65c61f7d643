-- Close a node once (completed, failed, cancelled, budget_exhausted); closing the root closes the tree.
-- KEYS: tree, node, events, claim, nodes, calls (the failed calls' ids: retained with the tree)
-- ARGV: node_id, status, result, error, now, worker, only_if (required current status, or ''), note, context_keys JSON,
--       token (the run's: the claim of the step this closes, or '' when no run is behind it),
--       node key prefix (for the retention of the tree's keys when it ends)
--       [, the model call whose reply this stores: record_call's 10 arguments (_lib.lua)]
-- The run that closes the node also ends there (its token leaves the node's open runs). With
-- a call, the call is recorded in the same script, with the same reads and writes of the node
-- and the tree: a call that lost its claim is recorded as waste and closes nothing (FENCED).
local node_id, status, now, token = ARGV[1], ARGV[2], ARGV[5], ARGV[10]
local call = ARGV[12] and {unpack(ARGV, 12, 21)}
local n, t = read_for_call(KEYS[1], KEYS[2], call and call[1],
  {'started_at', 'notes', 'resv_decide', 'resv_execute', 'resv_synthesize', 'kept_decide',
    'kept_execute', 'kept_synthesize', 'waiting', 'runs'},
  {'events_maxlen', 'done', status})
local cur = n.status
if not cur or not t.status then return {'MISSING'} end
-- The step's claim, when a run or a call is behind this close (nil: nobody holds it).
local holder = (token ~= '' or call) and redis.call('GET', KEYS[4]) or nil
local set, counts = {}, {}  -- what the node and the tree get, each in one HSET
local function written(reply)
  hset(KEYS[2], set)
  hset(KEYS[1], counts)
  return reply
end
if call and count_call(KEYS[1], KEYS[2], call, false, n, t, holder, set, counts) == 2 then
  return written({'FENCED', ''})
end
if TERMINAL[cur] then return written({'ALREADY', cur}) end
if token ~= '' and holder and holder ~= token then return written({'FENCED', cur}) end
if ARGV[7] ~= '' and cur ~= ARGV[7] then return written({'SKIPPED', cur}) end
MAXLEN[KEYS[1]] = t.events_maxlen or '10000'
put(set, 'status', status, 'finished_at', now)
if ARGV[3] ~= '' then put(set, 'result', ARGV[3]) end
if ARGV[4] ~= '' then put(set, 'error', ARGV[4]) end
if ARGV[6] ~= '' then put(set, 'worker', ARGV[6]) end
if ARGV[9] ~= '' then put(set, 'context_keys', ARGV[9]) end
if not n.started_at then put(set, 'started_at', now) end
if ARGV[8] ~= '' then
  local notes = cjson.decode(n.notes or '[]')
  table.insert(notes, ARGV[8])
  put(set, 'notes', cjson.encode(notes))
end
if n.kept_decide or n.kept_execute or n.kept_synthesize or n.waiting then
  redis.call('HDEL', KEYS[2], 'kept_decide', 'kept_execute', 'kept_synthesize', 'waiting')
end
for _, step in ipairs({'decide', 'execute', 'synthesize'}) do
  if n['resv_' .. step] then unreserve(KEYS[1], KEYS[2], step, nil) end
end
redis.call('DEL', KEYS[4])
if token ~= '' then
  local runs, open = runs_with(n.runs, token, false)
  put(set, 'runs', runs, 'open_runs', open)
end
redis.call('HSET', KEYS[2], unpack(set))
put(counts, 'done', num(t.done) + 1)
if status ~= 'completed' then put(counts, status, num(t[status]) + 1) end
redis.call('HSET', KEYS[1], unpack(counts))
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
  retain(KEYS[1], KEYS[5], KEYS[3], KEYS[6], ARGV[11])
end
return {'OK', status}
