-- Store a node's decision once; when it delegates, reserve node budget and create children.
-- KEYS: tree, node, events, nodes, claim, child_1 .. child_k (k = sub-tasks after clamping)
-- ARGV: node_id, now, worker, decision JSON {decision, reason, notes,
--       sub_tasks=[{requested_persona, task_details, after=[1-based sibling positions]}]},
--       token (the decide claim's holder, or '' when no model call is behind it)
-- Returns {decision, children csv, '1' when this call stored it}: the stored one if a decision
-- already exists.
local node_id, now, worker = ARGV[1], ARGV[2], ARGV[3]
local n = fields(KEYS[2], 'decision', 'children', 'depth', 'kept_decide', 'status')
if n.decision then return {n.decision, n.children or '', ''} end
local t = fields(KEYS[1], 'envelopes', 'max_nodes', 'reserved', 'events_maxlen', 'status')
local cur = n.status
if not cur or not t.status then
  return {'MISSING', ''}
end
MAXLEN[KEYS[1]] = t.events_maxlen or '10000'
-- Closed while its call ran (its subtree was cancelled): the decision belongs to no one.
if TERMINAL[cur] then return {'FENCED', ''} end
if ARGV[5] and ARGV[5] ~= '' then
  local holder = redis.call('GET', KEYS[5])
  if holder and holder ~= ARGV[5] then return {'FENCED', ''} end
end
local d = cjson.decode(ARGV[4])
local notes = d.notes or {}
local decision = d.decision
local k = #KEYS - 5
local allowed = 0
local envelopes = t.envelopes == '1'
if decision == 'delegate' then
  allowed = math.min(k, num(t.max_nodes) - num(t.reserved))
  local what = 'node budget'
  if envelopes then
    local room = envelope_room(KEYS[2])
    -- Named when it binds as tight as the tree's budget does: the clamp is the envelope's.
    if room and room <= allowed then allowed, what = room, 'node envelope' end
  end
  if allowed < k then
    table.insert(notes, 'clamped: ' .. what .. ' allowed ' .. math.max(allowed, 0) .. ' of ' .. k .. ' sub-tasks')
  end
  if allowed < 2 then
    allowed = 0
    decision = 'execute'
    table.insert(notes, 'clamped: fewer than 2 sub-tasks fit; executing instead')
  end
end
local depth = num(n.depth) + 1
local ids = {}
for i = 1, allowed do
  local cid = node_id .. '.' .. i
  local st = d.sub_tasks[i]
  local child = {'id', cid, 'parent', node_id, 'depth', depth,
    'persona', st.requested_persona, 'instructions', st.task_details,
    'status', 'queued', 'created_at', now}
  local after = {}  -- the siblings it starts after (those the node budget kept)
  for _, k in ipairs(type(st.after) == 'table' and st.after or {}) do
    if k <= allowed then table.insert(after, node_id .. '.' .. k) end
  end
  if #after > 0 then table.insert(child, 'after'); table.insert(child, table.concat(after, ',')) end
  redis.call('HSET', KEYS[5 + i], unpack(child))
  inherit_ttl(KEYS[1], KEYS[5 + i], t.status)
  ids[i] = cid
end
if allowed > 0 then redis.call('RPUSH', KEYS[4], unpack(ids)) end
if allowed > 0 then redis.call('HINCRBY', KEYS[1], 'reserved', allowed) end
if envelopes and allowed > 0 then
  -- Split what the node's envelope has left among its children, by their weights (even by
  -- default). Nodes: all of what is left below the new children. Tokens and USD: the node
  -- keeps one average share for its own synthesis.
  for _, key in ipairs(chain(KEYS[2])) do redis.call('HINCRBY', key, 'sub_nodes', allowed) end
  local nodes_left, tokens_left, cost_left = envelope_room(KEYS[2])
  local weights, total = {}, 0
  for i = 1, allowed do
    local w = tonumber(d.sub_tasks[i].weight) or 0
    if w <= 0 then w = 1 end
    weights[i], total = w, total + w
  end
  local given = 0
  for i = 1, allowed do
    local part = weights[i] / total
    local n = math.floor(math.max(nodes_left, 0) * part)
    given = given + n
    redis.call('HSET', KEYS[5 + i], 'env_nodes', n)
    if tokens_left then
      local share = math.floor(math.max(tokens_left, 0) * allowed / (allowed + 1) * part)
      redis.call('HSET', KEYS[5 + i], 'env_tokens', share)
    end
    if cost_left then
      local share = math.max(cost_left, 0) * allowed / (allowed + 1) * part
      redis.call('HSET', KEYS[5 + i], 'env_cost', string.format('%.10g', share))
    end
  end
  for i = 1, math.max(nodes_left, 0) - given do  -- what rounding left, to the first children
    redis.call('HINCRBY', KEYS[5 + ((i - 1) % allowed) + 1], 'env_nodes', 1)
  end
end
local children = table.concat(ids, ',')
local new_status = (allowed > 0) and 'delegated' or cur
redis.call('HSET', KEYS[2], 'decision', decision, 'reason', d.reason or '',
  'children', children, 'notes', cjson.encode(notes), 'status', new_status)
for _, note in ipairs(notes) do
  emit(KEYS[1], KEYS[3], 'node', node_id, 'status', new_status, 'note', note, 'ts', now)
end
emit(KEYS[1], KEYS[3], 'node', node_id, 'status', new_status, 'decision', decision,
  'children', tostring(allowed), 'worker', worker, 'ts', now)
for i = 1, allowed do
  emit(KEYS[1], KEYS[3], 'node', ids[i], 'status', 'queued', 'ts', now)
end
if n.kept_decide then redis.call('HDEL', KEYS[2], 'kept_decide') end
redis.call('DEL', KEYS[5])
return {decision, children, '1'}
