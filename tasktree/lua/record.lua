-- After every model call: add its usage to the node and the tree, once, for the claim holder.
-- KEYS: tree, node, claim, the tree's counted calls
-- ARGV: step, model, prompt_tokens, completion_tokens, cost_usd, cost_unknown (0/1), latency, token, text, call id
-- A recorded reply is also kept in the node (`kept_<step>`, a JSON list in call order) until the
-- step's outcome is stored, so a run that dies in between is replayed, not paid for again.
-- Returns 1 recorded; 0 already recorded (the script was sent again); 2 recorded as waste (the
-- call's attempt had lost its claim to another); -1 no such tree (the store was reset).
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
if redis.call('SADD', KEYS[4], ARGV[10]) == 0 then return 0 end
inherit_ttl(KEYS[1], KEYS[4])
unreserve(KEYS[1], KEYS[2], ARGV[1], ARGV[8])  -- the actual usage replaces the worst case
redis.call('HDEL', KEYS[2], 'waiting')
local holder = redis.call('GET', KEYS[3])
local tokens = tonumber(ARGV[3]) + tonumber(ARGV[4])
-- Late: another run holds the step now, or already finished it (the claim is gone then).
local status = redis.call('HGET', KEYS[2], 'status')
local done = TERMINAL[status] or (ARGV[1] == 'decide' and redis.call('HEXISTS', KEYS[2], 'decision') == 1)
if (holder and holder ~= ARGV[8]) or done then
  for i = 1, 2 do
    redis.call('HINCRBY', KEYS[i], 'waste_calls', 1)
    redis.call('HINCRBY', KEYS[i], 'waste_tokens', tokens)
    redis.call('HINCRBYFLOAT', KEYS[i], 'waste_cost_usd', ARGV[5])
  end
  return 2
end
for i = 1, 2 do
  redis.call('HINCRBY', KEYS[i], 'calls', 1)
  redis.call('HINCRBY', KEYS[i], 'prompt_tokens', ARGV[3])
  redis.call('HINCRBY', KEYS[i], 'completion_tokens', ARGV[4])
  redis.call('HINCRBYFLOAT', KEYS[i], 'cost_usd', ARGV[5])
  if ARGV[6] == '1' then redis.call('HSET', KEYS[i], 'cost_unknown', '1') end
end
if envelopes_on(KEYS[1]) then chain_add(KEYS[2], 'sub_tokens', 'sub_cost', tokens, num(ARGV[5])) end
redis.call('HSET', KEYS[2], 'model', ARGV[2])
local kept = cjson.decode(redis.call('HGET', KEYS[2], 'kept_' .. ARGV[1]) or '[]')
table.insert(kept, ARGV[9])
redis.call('HSET', KEYS[2], 'kept_' .. ARGV[1], cjson.encode(kept))
redis.call('HINCRBYFLOAT', KEYS[2], 'lat_' .. ARGV[1], ARGV[7])
return 1
