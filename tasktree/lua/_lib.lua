-- Shared prelude, prepended to every script by store.py after the status sets that
-- tasktree/states.py generates (TERMINAL: node statuses; TREE_IDLE: tree statuses).

-- An event on the tree's stream, capped at the tree's `events_maxlen` (read once per script).
local MAXLEN = {}
local function emit(tree_key, events_key, ...)
  MAXLEN[tree_key] = MAXLEN[tree_key] or redis.call('HGET', tree_key, 'events_maxlen') or '10000'
  redis.call('XADD', events_key, 'MAXLEN', '~', MAXLEN[tree_key], '*', ...)
end

-- Some fields of a hash in one HMGET, by name (a field absent is nil).
local function fields(key, ...)
  local names, out = {...}, {}
  local values = redis.call('HMGET', key, ...)
  for i, name in ipairs(names) do out[name] = values[i] or nil end
  return out
end

-- A field's value in an HGETALL reply (nil when absent).
local function field_of(flat, name)
  for i = 1, #flat, 2 do if flat[i] == name then return flat[i + 1] end end
end

-- One command on a key with many arguments, in chunks that stay under Lua's unpack limit.
local function call_chunked(command, key, args)
  for i = 1, #args, 4000 do
    redis.call(command, key, unpack(args, i, math.min(i + 3999, #args)))
  end
end

local function num(v)
  return tonumber(v) or 0
end

-- Redis's clock in milliseconds: the one clock leases and limits are scored by.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A model's concurrency now: the configured one (0: none), or the cut a 429 made if lower.
local function model_limit(conc, adapted_key)
  local cap = tonumber(redis.call('HGET', adapted_key, 'cap') or '')
  if not cap then return conc end
  cap = math.max(1, math.floor(cap))
  if conc == 0 or cap < conc then return cap end
  return conc
end

-- A key made for a tree that has ended expires with it (the tree key's TTL, if it has one).
-- Only an ended tree has a TTL: a caller that read the tree's status passes it, and a tree
-- still at work costs no PTTL.
local function inherit_ttl(tree_key, key, tree_status)
  if tree_status and not TREE_IDLE[tree_status] then return end
  local ttl = redis.call('PTTL', tree_key)
  if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
end

-- An ended tree's keys expire after its retention (the tree's `ttl` field, seconds; 0 or
-- none keeps them). The node keys are the prefix (from keys.py) plus each node id.
local function retain(tree_key, nodes_key, events_key, calls_key, node_prefix)
  local ttl = num(redis.call('HGET', tree_key, 'ttl'))
  if ttl <= 0 then return end
  for _, id in ipairs(redis.call('LRANGE', nodes_key, 0, -1)) do
    redis.call('EXPIRE', node_prefix .. id, ttl)
  end
  for _, k in ipairs({tree_key, nodes_key, events_key, calls_key}) do
    redis.call('EXPIRE', k, ttl)
  end
end

-- A node's open runs are the tokens in its `runs` field (comma-separated) of the runs that
-- began and have not ended; `open_runs` is how many. The field with `token` added (add) or
-- taken out: its new value, the count, and whether the token was there before.
local function runs_with(runs, token, add)
  local out, found = {}, false
  for t in string.gmatch(runs or '', '[^,]+') do
    if t == token then found = true end
    if t ~= token or add then table.insert(out, t) end
  end
  if add and not found then table.insert(out, token) end
  return table.concat(out, ','), #out, found
end


-- Budget envelopes (a tree with `envelopes` = 1). Each node of such a tree has an envelope:
-- `env_nodes`, the nodes its subtree may create below it; `env_tokens` and `env_cost`, what
-- its subtree (the node included) may spend, present only when the tree has that budget.
-- Against them count `sub_nodes` (nodes created below it), `sub_tokens` and `sub_cost` (its
-- subtree's recorded usage) and `held_tokens` and `held_cost` (its subtree's reservations).
-- A call must fit the envelope of its node and of every ancestor, so what a closed subtree
-- left unused is back in its parent's envelope at once.

-- The keys of a node and of its ancestors, nearest first: a node key is a prefix and the
-- node's path ("...:node:0.2.1"), and an ancestor's path is a prefix of the node's.
local function chain(node_key)
  local prefix, id = string.match(node_key, '^(.*:)([^:]+)$')
  local out = {}
  while id do
    table.insert(out, prefix .. id)
    id = string.match(id, '^(.*)%.[^.]+$')
  end
  return out
end

local function envelopes_on(tree_key)
  return redis.call('HGET', tree_key, 'envelopes') == '1'
end

-- Add to two counters of a node and of each of its ancestors.
local function chain_add(node_key, tokens_field, cost_field, tokens, cost)
  for _, k in ipairs(chain(node_key)) do
    if tokens ~= 0 then redis.call('HINCRBY', k, tokens_field, tokens) end
    if cost ~= 0 then redis.call('HINCRBYFLOAT', k, cost_field, cost) end
  end
end

-- What the tightest envelope on a node's chain leaves: nodes, tokens, USD (nil: no limit);
-- then tokens and USD as they would be with no call in flight (the holds given back).
local function envelope_room(node_key)
  local rn, rt, rc, ft, fc = nil, nil, nil, nil, nil
  for _, k in ipairs(chain(node_key)) do
    local e = redis.call('HMGET', k, 'env_nodes', 'sub_nodes', 'env_tokens', 'sub_tokens',
      'held_tokens', 'env_cost', 'sub_cost', 'held_cost')
    if e[1] then rn = math.min(rn or math.huge, num(e[1]) - num(e[2])) end
    if e[3] then
      rt = math.min(rt or math.huge, num(e[3]) - num(e[4]) - num(e[5]))
      ft = math.min(ft or math.huge, num(e[3]) - num(e[4]))
    end
    if e[6] then
      rc = math.min(rc or math.huge, num(e[6]) - num(e[7]) - num(e[8]))
      fc = math.min(fc or math.huge, num(e[6]) - num(e[7]))
    end
  end
  return rn, rt, rc, ft, fc
end

-- Raise the envelopes of the root and of every node in `ids` (and their ancestors), each key
-- once: a top-up or a retry with larger budgets reaches the subtrees that stopped on theirs.
-- add: {max_nodes, max_tokens, max_cost} amounts (absent: unchanged).
local function widen(node_prefix, ids, add)
  local seen = {}
  local targets = {node_prefix .. '0'}
  for _, id in ipairs(ids) do
    for _, k in ipairs(chain(node_prefix .. id)) do table.insert(targets, k) end
  end
  for _, k in ipairs(targets) do
    if not seen[k] then
      seen[k] = true
      local e = redis.call('HMGET', k, 'env_tokens', 'env_cost')
      if add.max_nodes then redis.call('HINCRBY', k, 'env_nodes', add.max_nodes) end
      if add.max_tokens and e[1] then redis.call('HINCRBY', k, 'env_tokens', add.max_tokens) end
      if add.max_cost and e[2] then redis.call('HINCRBYFLOAT', k, 'env_cost', add.max_cost) end
    end
  end
end

-- A step's budget reservation, in the node's `resv_<step>` field as "token|tokens|cost": made
-- by the gate before a call, given back when the call is recorded, fails or its node closes.
-- With a token, only that run's reservation is given back.
local function unreserve(tree_key, node_key, step, token)
  local r = redis.call('HGET', node_key, 'resv_' .. step)
  if not r then return end
  local holder, t, c = string.match(r, '^([^|]*)|([^|]*)|([^|]*)$')
  if token and token ~= '' and holder ~= token then return end
  redis.call('HINCRBY', tree_key, 'reserved_tokens', -num(t))
  redis.call('HINCRBYFLOAT', tree_key, 'reserved_cost', -num(c))
  redis.call('HDEL', node_key, 'resv_' .. step)
  if envelopes_on(tree_key) then chain_add(node_key, 'held_tokens', 'held_cost', -num(t), -num(c)) end
end

-- The fields count_call reads of the node and of the tree, for a call of `step` (before
-- 'status', which the caller adds last).
local function call_fields(step)
  return {'decision', 'resv_' .. step, 'waiting', 'kept_' .. step, 'lat_' .. step, 'calls',
    'prompt_tokens', 'completion_tokens', 'waste_calls', 'waste_tokens', 'call_ids'},
    {'envelopes', 'calls', 'prompt_tokens', 'completion_tokens', 'waste_calls', 'waste_tokens'}
end

local function put(list, ...)
  for _, v in ipairs({...}) do table.insert(list, v) end
end

-- A node's counted calls are known by their ids in its `call_ids` field (comma-separated,
-- the last CALL_IDS): a script re-sent after a lost reply comes right after the first, and
-- no node makes that many calls in between. The field with `id` added, oldest dropped.
local CALL_IDS = 32
local function recent_ids(seen, id)
  local ids = {}
  for x in string.gmatch(seen, '[^,]+') do table.insert(ids, x) end
  table.insert(ids, id)
  return table.concat(ids, ',', math.max(1, #ids - CALL_IDS + 1))
end

-- A model call's usage, added to its node and tree once (per call id), for the claim holder.
-- a: step, model, prompt_tokens, completion_tokens, cost_usd, cost_unknown (0/1), latency,
--    token, text, call id. With `keep`, the reply is also kept in the node (`kept_<step>`, a
-- JSON list in call order) until the step's outcome is stored, so a run that dies in between
-- is replayed, not paid for again; a caller that stores the outcome in the same script keeps
-- nothing. Returns 1 recorded; 0 already recorded (the script was sent again); 2 recorded as
-- waste (the call's attempt had lost its claim to another); -1 no such tree or node.
-- Each hash is read once and written once: the counters are summed here (exact for integers).
-- count_call counts the call into `nset` and `tset` (field, value lists the caller HSETs on
-- the node and the tree) from `n` and `t` (read with call_fields) and `holder` (the step's
-- claim), so the caller writes each hash once, with whatever else it stores there.
local function count_call(tree_key, node_key, a, keep, n, t, holder, nset, tset)
  local step, token = a[1], a[8]
  local resv, kept_f, lat_f = 'resv_' .. step, 'kept_' .. step, 'lat_' .. step
  local seen = n.call_ids or ''
  if string.find(',' .. seen .. ',', ',' .. a[10] .. ',', 1, true) then return 0 end
  put(nset, 'call_ids', recent_ids(seen, a[10]))
  if n[resv] then  -- usage replaces the worst case
    unreserve(tree_key, node_key, step, token)
    n[resv] = nil
  end
  if n.waiting then
    redis.call('HDEL', node_key, 'waiting')
    n.waiting = nil
  end
  local prompt, completion = num(a[3]), num(a[4])
  local tokens, cost = prompt + completion, num(a[5])
  -- Late: another run holds the step now, or already finished it (the claim is gone then).
  local done = TERMINAL[n.status] or (step == 'decide' and n.decision)
  if (holder and holder ~= token) or done then
    for _, h in ipairs({{node_key, n, nset}, {tree_key, t, tset}}) do
      local f = h[2]
      put(h[3], 'waste_calls', num(f.waste_calls) + 1, 'waste_tokens', num(f.waste_tokens) + tokens)
      if cost ~= 0 then redis.call('HINCRBYFLOAT', h[1], 'waste_cost_usd', a[5]) end
    end
    return 2
  end
  for _, h in ipairs({{node_key, n, nset}, {tree_key, t, tset}}) do
    local f, set = h[2], h[3]
    put(set, 'calls', num(f.calls) + 1, 'prompt_tokens', num(f.prompt_tokens) + prompt,
      'completion_tokens', num(f.completion_tokens) + completion)
    if a[6] == '1' then put(set, 'cost_unknown', '1') end
    if h[1] == node_key then
      put(set, 'model', a[2], lat_f, tostring(num(n[lat_f]) + num(a[7])))
      if keep then
        local kept = cjson.decode(n[kept_f] or '[]')
        table.insert(kept, a[9])
        put(set, kept_f, cjson.encode(kept))
      end
    end
    if cost ~= 0 then redis.call('HINCRBYFLOAT', h[1], 'cost_usd', a[5]) end
  end
  if t.envelopes == '1' then chain_add(node_key, 'sub_tokens', 'sub_cost', tokens, cost) end
  return 1
end

-- Write a field, value list to a hash (nothing when it is empty).
local function hset(key, set)
  if #set > 0 then redis.call('HSET', key, unpack(set)) end
end

-- Read the node's and the tree's fields in one HMGET each: `extra_n`, `extra_t` and what
-- count_call needs for a call of `step` (none without), 'status' last.
local function read_for_call(tree_key, node_key, step, extra_n, extra_t)
  local nf, tf = {}, {}
  for _, f in ipairs(extra_n) do table.insert(nf, f) end
  for _, f in ipairs(extra_t) do table.insert(tf, f) end
  if step then
    local cn, ct = call_fields(step)
    for _, f in ipairs(cn) do table.insert(nf, f) end
    for _, f in ipairs(ct) do table.insert(tf, f) end
  end
  table.insert(nf, 'status'); table.insert(tf, 'status')
  return fields(node_key, unpack(nf)), fields(tree_key, unpack(tf))
end

-- The same, as a script of its own (record.lua): the call's reads and writes only.
local function record_call(tree_key, node_key, claim_key, a, keep)
  local n, t = read_for_call(tree_key, node_key, a[1], {}, {})
  if not n.status or not t.status then return -1 end
  local nset, tset = {}, {}
  local r = count_call(tree_key, node_key, a, keep, n, t,
    redis.call('GET', claim_key), nset, tset)
  hset(node_key, nset)
  hset(tree_key, tset)
  return r
end
