-- After every LLM call: add its usage to the node and the tree.
-- KEYS: tree, node
-- ARGV: step, model, prompt_tokens, completion_tokens, cost_usd, cost_unknown (0/1), latency
for _, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, 'calls', 1)
  redis.call('HINCRBY', key, 'prompt_tokens', ARGV[3])
  redis.call('HINCRBY', key, 'completion_tokens', ARGV[4])
  redis.call('HINCRBYFLOAT', key, 'cost_usd', ARGV[5])
  if ARGV[6] == '1' then redis.call('HSET', key, 'cost_unknown', '1') end
end
redis.call('HSET', KEYS[2], 'model', ARGV[2])
redis.call('HINCRBYFLOAT', KEYS[2], 'lat_' .. ARGV[1], ARGV[7])
return 1
