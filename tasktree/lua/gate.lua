-- Before every LLM call: may this attempt call the model for this node's step now?
-- KEYS: tree, node, claim, events
-- ARGV: node_id, step, token, lease_ms, running_status, now, worker
local node_id, step, token = ARGV[1], ARGV[2], ARGV[3]
local status = redis.call('HGET', KEYS[2], 'status')
if not status then return {'MISSING'} end
if TERMINAL[status] then return {'DONE'} end
if step == 'decide' and redis.call('HEXISTS', KEYS[2], 'decision') == 1 then return {'DONE'} end
local tstatus = redis.call('HGET', KEYS[1], 'status')
if tstatus ~= 'running' then return {'CANCELLED'} end
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= token then return {'BUSY', tostring(redis.call('PTTL', KEYS[3]))} end
local t = redis.call('HMGET', KEYS[1], 'max_cost', 'cost_usd', 'max_tokens', 'prompt_tokens', 'completion_tokens')
if num(t[1]) > 0 and num(t[2]) >= num(t[1]) then return {'EXHAUSTED', 'cost'} end
if num(t[3]) > 0 and num(t[4]) + num(t[5]) >= num(t[3]) then return {'EXHAUSTED', 'tokens'} end
redis.call('SET', KEYS[3], token, 'PX', ARGV[4])
if status ~= ARGV[5] then
  redis.call('HSET', KEYS[2], 'status', ARGV[5], 'worker', ARGV[7])
  if redis.call('HEXISTS', KEYS[2], 'started_at') == 0 then
    redis.call('HSET', KEYS[2], 'started_at', ARGV[6])
  end
  emit(KEYS[1], KEYS[4], 'node', node_id, 'status', ARGV[5], 'worker', ARGV[7], 'ts', ARGV[6])
end
return {'OK'}
