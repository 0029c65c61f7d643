-- Open a tree again in place, for `retry` and for `resume`.
-- Retry (an ended tree): the nodes to re-run and the ancestors to re-synthesize open again,
-- everything else keeps what it stored. Each reopened node keeps a history of what it
-- replaced (`attempts`); a node with a stored delegation keeps it and waits for its children
-- (`delegated`), any other keeps its decision, if any, and is queued. The tree's keys lose
-- the retention TTL they got when it ended, and its budgets and model may change.
-- Resume (an interrupted tree): every open node loses the claims and run counts of the runs
-- that were abandoned, and keeps everything stored.
-- Either way the tree runs again on the given queues.
-- KEYS: tree, events, nodes, calls, then per node: node, claim decide, claim execute,
--       claim synthesize, synthesis sent
-- ARGV: now, node queue, synthesis queue, why, JSON list of node ids to reopen,
--       JSON object of tree fields to set (budgets, model), '1' to resume
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'MISSING'} end
local resume = ARGV[7] == '1'
if resume then
  if status ~= 'interrupted' then return {'NOOP', status} end
elseif not TREE_IDLE[status] or status == 'interrupted' then
  return {'NOOP', status}
end
if redis.call('LLEN', KEYS[3]) * 5 ~= #KEYS - 4 then return {'RETRY'} end
local now, why = ARGV[1], ARGV[4]
local reopen = {}
for _, id in ipairs(cjson.decode(ARGV[5])) do reopen[id] = true end
local count = 0
for i = 5, #KEYS, 5 do
  local id = redis.call('HGET', KEYS[i], 'id')
  if resume then
    local cur = redis.call('HGET', KEYS[i], 'status')
    if cur and not TERMINAL[cur] then
      redis.call('HSET', KEYS[i], 'open_runs', 0)
      redis.call('HDEL', KEYS[i], 'retry_at', 'runs')
      redis.call('DEL', KEYS[i + 1], KEYS[i + 2], KEYS[i + 3], KEYS[i + 4])
      count = count + 1
    end
  elseif id and reopen[id] then
    local n = redis.call('HMGET', KEYS[i], 'result', 'error', 'calls', 'finished_at', 'decision', 'status')
    local attempts = cjson.decode(redis.call('HGET', KEYS[i], 'attempts') or '[]')
    if type(attempts) ~= 'table' or attempts[1] == nil then attempts = {} end
    table.insert(attempts, {replaced_at = now, why = why, status = n[6] or '',
      result = string.sub(n[1] or '', 1, 2000), error = string.sub(n[2] or '', 1, 500),
      calls = num(n[3]), finished_at = n[4] or ''})
    if TERMINAL[n[6]] then
      redis.call('HINCRBY', KEYS[1], 'done', -1)
      if n[6] ~= 'completed' then redis.call('HINCRBY', KEYS[1], n[6], -1) end
    end
    local to = (n[5] == 'delegate') and 'delegated' or 'queued'
    redis.call('HDEL', KEYS[i], 'result', 'error', 'finished_at', 'context_keys', 'retry_at',
      'last_error', 'started_at', 'waiting', 'kept_decide', 'kept_execute', 'kept_synthesize',
      'failed_decide', 'failed_execute', 'failed_synthesize', 'runs')
    redis.call('HSET', KEYS[i], 'status', to, 'open_runs', 0, 'attempts', cjson.encode(attempts))
    redis.call('DEL', KEYS[i + 1], KEYS[i + 2], KEYS[i + 3], KEYS[i + 4])
    emit(KEYS[1], KEYS[2], 'node', id, 'status', to, 'note', why, 'ts', now)
    count = count + 1
  end
  redis.call('PERSIST', KEYS[i])
end
local updates = cjson.decode(ARGV[6])
if envelopes_on(KEYS[1]) and #KEYS > 4 then  -- larger budgets widen the reopened envelopes
  local grow = {}
  for _, field in ipairs({'max_nodes', 'max_tokens', 'max_cost'}) do
    if updates[field] then grow[field] = updates[field] - num(redis.call('HGET', KEYS[1], field)) end
  end
  local ids = cjson.decode(ARGV[5])
  widen(string.match(KEYS[5], '^(.*:)[^:]+$'), type(ids) == 'table' and ids or {}, grow)
end
for field, value in pairs(updates) do redis.call('HSET', KEYS[1], field, tostring(value)) end
for k = 1, 4 do redis.call('PERSIST', KEYS[k]) end
redis.call('HSET', KEYS[1], 'status', 'running', 'queue', ARGV[2], 'synth_queue', ARGV[3])
redis.call('HDEL', KEYS[1], 'finished_at', 'interrupted_at')
local note = resume and ('resumed: ' .. count .. ' open node(s)') or (why .. ': ' .. count .. ' node(s) reopened')
emit(KEYS[1], KEYS[2], 'tree', 'running', 'note', note, 'ts', now)
return {'OK', tostring(count)}
