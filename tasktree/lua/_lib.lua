-- Shared prelude, prepended to every script by store.py after the status sets that
-- tasktree/states.py generates (TERMINAL: node statuses; TREE_IDLE: tree statuses).

local function emit(tree_key, events_key, ...)
  local maxlen = redis.call('HGET', tree_key, 'events_maxlen') or '10000'
  redis.call('XADD', events_key, 'MAXLEN', '~', maxlen, '*', ...)
end

local function num(v)
  return tonumber(v) or 0
end

-- Redis's clock in milliseconds: the one clock leases and limits are scored by.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A key made for a tree that has ended expires with it (the tree key's TTL, if it has one).
local function inherit_ttl(tree_key, key)
  local ttl = redis.call('PTTL', tree_key)
  if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
end

-- An ended tree's keys expire after its retention (the tree's `ttl` field, seconds; 0 or
-- none keeps them). The node and run keys are the prefixes (from keys.py) plus each node id.
local function retain(tree_key, nodes_key, events_key, calls_key, node_prefix, runs_prefix)
  local ttl = num(redis.call('HGET', tree_key, 'ttl'))
  if ttl <= 0 then return end
  for _, id in ipairs(redis.call('LRANGE', nodes_key, 0, -1)) do
    redis.call('EXPIRE', node_prefix .. id, ttl)
    redis.call('EXPIRE', runs_prefix .. id, ttl)
  end
  for _, k in ipairs({tree_key, nodes_key, events_key, calls_key}) do
    redis.call('EXPIRE', k, ttl)
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
end
