-- Before every LLM call: may this attempt call the model for this node's step now?
-- KEYS: tree, node, claim, events
-- ARGV: node_id, step, token, lease_ms, running_status, now, worker,
--       completion cap (0: reserve nothing), prompt tokens, USD per input token, per output token
--       [, reason, note: an undecided node at the depth limit decides to execute here]
-- With a cap and a token or cost budget, the call's worst case (its prompt and a completion
-- at the cap, priced) is reserved, the cap shrunk to what fits; returns {'OK', cap}. When
-- only the worst cases reserved by calls in flight leave no room, in the tree's budgets or in
-- an envelope on the node's chain, RESERVED: try again later.
local node_id, step, token = ARGV[1], ARGV[2], ARGV[3]
local n = fields(KEYS[2], 'decision', 'resv_' .. step, 'retry_at', 'started_at', 'depth', 'status')
local status = n.status
if not status then return {'MISSING'} end
if TERMINAL[status] then return {'DONE'} end
if step == 'decide' and n.decision then return {'DONE'} end
local t = redis.call('HMGET', KEYS[1], 'max_cost', 'cost_usd', 'max_tokens', 'prompt_tokens',
  'completion_tokens', 'reserved_tokens', 'reserved_cost', 'envelopes', 'events_maxlen',
  'max_depth', 'status')
local tstatus = t[11]
MAXLEN[KEYS[1]] = t[9] or '10000'
if tstatus == 'interrupted' then return {'INTERRUPTED'} end
if tstatus ~= 'running' then return {'CANCELLED'} end
-- The step's claim: taken here if nobody holds it, or this token's already (a retried call).
local took = redis.call('SET', KEYS[3], token, 'NX', 'PX', ARGV[4])
if not took then
  local holder = redis.call('GET', KEYS[3])
  if holder and holder ~= token then return {'BUSY', tostring(redis.call('PTTL', KEYS[3]))} end
end
-- A refusal from here on gives back a claim this gate took.
local function refuse(reply)
  if took then redis.call('DEL', KEYS[3]) end
  return reply
end
-- A node at the depth limit has no decision call: its execute gate stores the decision. If the
-- limit was raised since its run read it, it decides like any other node (UNDECIDED).
local by_depth = ARGV[12] and not n.decision
if by_depth and num(n.depth) < num(t[10]) then return refuse({'UNDECIDED'}) end
if ARGV[12] and n.decision and n.decision ~= 'execute' then return refuse({'DONE'}) end
if n['resv_' .. step] then  -- left by a run that lost this step's claim
  unreserve(KEYS[1], KEYS[2], step, nil)
  t = redis.call('HMGET', KEYS[1], 'max_cost', 'cost_usd', 'max_tokens', 'prompt_tokens',
    'completion_tokens', 'reserved_tokens', 'reserved_cost', 'envelopes')
end
if num(t[1]) > 0 and num(t[2]) >= num(t[1]) then return refuse({'EXHAUSTED', 'cost budget'}) end
if num(t[3]) > 0 and num(t[4]) + num(t[5]) >= num(t[3]) then return refuse({'EXHAUSTED', 'token budget'}) end
-- With envelopes, the tightest envelope on the node's chain may leave less than the tree.
local envelopes = t[8] == '1'  -- the tree's `envelopes`, read with its budgets
local _, env_tokens, env_cost, free_tokens, free_cost = nil, nil, nil, nil, nil
if envelopes then _, env_tokens, env_cost, free_tokens, free_cost = envelope_room(KEYS[2]) end
-- Spent, or only held by calls in flight (RESERVED: they give it back as they end).
local function envelope_refusal(free, what)
  if free > 0 then return refuse({'RESERVED', what}) end
  return refuse({'EXHAUSTED', what})
end
if env_cost and env_cost <= 0 then return envelope_refusal(free_cost, 'cost envelope') end
if env_tokens and env_tokens <= 0 then return envelope_refusal(free_tokens, 'token envelope') end
local cap, prompt = num(ARGV[8]), num(ARGV[9])
local per_in, per_out = num(ARGV[10]), num(ARGV[11])
local MIN_COMPLETION = 16
if cap > 0 and (num(t[1]) > 0 or num(t[3]) > 0) then
  if num(t[3]) > 0 then
    local left, what = num(t[3]) - num(t[4]) - num(t[5]) - num(t[6]), 'token budget'
    if env_tokens and env_tokens < left then left, what = env_tokens, 'token envelope' end
    left = left - prompt
    if left < MIN_COMPLETION then
      -- Room that calls in flight hold as their worst case comes back as they end: wait.
      local free = num(t[3]) - num(t[4]) - num(t[5])
      if free_tokens and free_tokens < free then free = free_tokens end
      if free - prompt >= MIN_COMPLETION then return refuse({'RESERVED', what}) end
      return refuse({'EXHAUSTED', what})
    end
    cap = math.min(cap, left)
  end
  if num(t[1]) > 0 and per_out > 0 then
    local left, what = num(t[1]) - num(t[2]) - num(t[7]), 'cost budget'
    if env_cost and env_cost < left then left, what = env_cost, 'cost envelope' end
    local fits = math.floor((left - prompt * per_in) / per_out)
    if fits < MIN_COMPLETION then
      local free = num(t[1]) - num(t[2])
      if free_cost and free_cost < free then free = free_cost end
      if math.floor((free - prompt * per_in) / per_out) >= MIN_COMPLETION then
        return refuse({'RESERVED', what})
      end
      return refuse({'EXHAUSTED', what})
    end
    cap = math.min(cap, fits)
  end
  local tokens, cost = prompt + cap, prompt * per_in + cap * per_out
  redis.call('HINCRBY', KEYS[1], 'reserved_tokens', tokens)
  redis.call('HINCRBYFLOAT', KEYS[1], 'reserved_cost', cost)
  redis.call('HSET', KEYS[2], 'resv_' .. step, ARGV[3] .. '|' .. tokens .. '|' .. string.format('%.12g', cost))
  if envelopes then chain_add(KEYS[2], 'held_tokens', 'held_cost', tokens, cost) end
else
  cap = 0
end
if not took then redis.call('SET', KEYS[3], token, 'PX', ARGV[4]) end  -- a lease anew
if n.retry_at then redis.call('HDEL', KEYS[2], 'retry_at') end
local set = {'call_at', ARGV[6]}
if by_depth then
  local notes = cjson.encode({ARGV[13]})
  for _, v in ipairs({'decision', 'execute', 'reason', ARGV[12], 'children', '', 'notes', notes}) do
    table.insert(set, v)
  end
end
if status ~= ARGV[5] then
  for _, v in ipairs({'status', ARGV[5], 'worker', ARGV[7]}) do table.insert(set, v) end
  if not n.started_at then table.insert(set, 'started_at'); table.insert(set, ARGV[6]) end
end
redis.call('HSET', KEYS[2], unpack(set))
if by_depth then  -- one event: the decision, why no call made it, and the step it starts
  emit(KEYS[1], KEYS[4], 'node', node_id, 'status', ARGV[5], 'decision', 'execute',
    'children', '0', 'note', ARGV[13], 'worker', ARGV[7], 'ts', ARGV[6])
elseif status ~= ARGV[5] then
  emit(KEYS[1], KEYS[4], 'node', node_id, 'status', ARGV[5], 'worker', ARGV[7], 'ts', ARGV[6])
end
return {'OK', tostring(cap)}
