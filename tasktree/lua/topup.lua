-- Raise a tree's budgets by the given amounts, at once. A cost or token budget the tree does
-- not have (0: none) cannot be raised. Depth and nodes stop at their hard limits.
-- With envelopes, the root's envelope grows by the amounts, and so does the envelope of every
-- node that stopped on its budget, and of that node's ancestors.
-- KEYS: tree, events, nodes
-- ARGV: now, JSON {max_nodes, max_cost, max_tokens, max_depth} (amounts to add), node key prefix
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'MISSING'} end
local add = cjson.decode(ARGV[2])
for _, field in ipairs({'max_cost', 'max_tokens'}) do
  if add[field] and num(redis.call('HGET', KEYS[1], field)) <= 0 then return {'NONE', field} end
end
local limits = {max_nodes = 100000, max_depth = 20}
local decimal = {max_cost = true}
local changed = {}
for _, field in ipairs({'max_nodes', 'max_cost', 'max_tokens', 'max_depth'}) do
  if add[field] then
    local value = num(redis.call('HGET', KEYS[1], field)) + add[field]
    if limits[field] then value = math.min(value, limits[field]) end
    if decimal[field] then
      redis.call('HSET', KEYS[1], field, string.format('%.10g', value))
    else
      redis.call('HSET', KEYS[1], field, string.format('%d', value))
    end
    table.insert(changed, field .. '=' .. redis.call('HGET', KEYS[1], field))
  end
end
if envelopes_on(KEYS[1]) then
  local stopped = {}
  for _, id in ipairs(redis.call('LRANGE', KEYS[3], 0, -1)) do
    if redis.call('HGET', ARGV[3] .. id, 'status') == 'budget_exhausted' then
      table.insert(stopped, id)
    end
  end
  widen(ARGV[3], stopped, add)
end
emit(KEYS[1], KEYS[2], 'tree', status, 'note', 'budget raised: ' .. table.concat(changed, ' '), 'ts', ARGV[1])
return {'OK', status}
