-- After every model call: add its usage to the node and the tree, once, for the claim holder.
-- KEYS: tree, node, claim, the tree's counted calls
-- ARGV: step, model, prompt_tokens, completion_tokens, cost_usd, cost_unknown (0/1), latency, token, text, call id
-- A recorded reply is also kept in the node (`kept_<step>`, a JSON list in call order) until the
-- step's outcome is stored, so a run that dies in between is replayed, not paid for again.
-- Returns 1 recorded; 0 already recorded (the script was sent again); 2 recorded as waste (the
-- call's attempt had lost its claim to another); -1 no such tree (the store was reset).
-- Each hash is read once and written once: the counters are summed here (exact for integers).
local step, token = ARGV[1], ARGV[8]
local resv, kept_f, lat_f = 'resv_' .. step, 'kept_' .. step, 'lat_' .. step
local n = fields(KEYS[2], 'decision', resv, 'waiting', kept_f, lat_f, 'calls',
  'prompt_tokens', 'completion_tokens', 'waste_calls', 'waste_tokens', 'status')
local t = fields(KEYS[1], 'envelopes', 'calls', 'prompt_tokens', 'completion_tokens',
  'waste_calls', 'waste_tokens', 'status')
if not n.status or not t.status then return -1 end
if redis.call('SADD', KEYS[4], ARGV[10]) == 0 then return 0 end
inherit_ttl(KEYS[1], KEYS[4], t.status)
if n[resv] then unreserve(KEYS[1], KEYS[2], step, token) end  -- the usage replaces the worst case
if n.waiting then redis.call('HDEL', KEYS[2], 'waiting') end
local holder = redis.call('GET', KEYS[3])
local prompt, completion = num(ARGV[3]), num(ARGV[4])
local tokens, cost = prompt + completion, num(ARGV[5])
-- Late: another run holds the step now, or already finished it (the claim is gone then).
local done = TERMINAL[n.status] or (step == 'decide' and n.decision)
if (holder and holder ~= token) or done then
  for _, h in ipairs({{KEYS[2], n}, {KEYS[1], t}}) do
    local f = h[2]
    redis.call('HSET', h[1], 'waste_calls', num(f.waste_calls) + 1,
      'waste_tokens', num(f.waste_tokens) + tokens)
    if cost ~= 0 then redis.call('HINCRBYFLOAT', h[1], 'waste_cost_usd', ARGV[5]) end
  end
  return 2
end
local kept = cjson.decode(n[kept_f] or '[]')
table.insert(kept, ARGV[9])
for _, h in ipairs({{KEYS[2], n}, {KEYS[1], t}}) do
  local f = h[2]
  local set = {'calls', num(f.calls) + 1, 'prompt_tokens', num(f.prompt_tokens) + prompt,
    'completion_tokens', num(f.completion_tokens) + completion}
  if ARGV[6] == '1' then table.insert(set, 'cost_unknown'); table.insert(set, '1') end
  if h[1] == KEYS[2] then
    for _, v in ipairs({'model', ARGV[2], kept_f, cjson.encode(kept),
      lat_f, tostring(num(n[lat_f]) + num(ARGV[7]))}) do table.insert(set, v) end
  end
  redis.call('HSET', h[1], unpack(set))
  if cost ~= 0 then redis.call('HINCRBYFLOAT', h[1], 'cost_usd', ARGV[5]) end
end
if t.envelopes == '1' then chain_add(KEYS[2], 'sub_tokens', 'sub_cost', tokens, cost) end
return 1
