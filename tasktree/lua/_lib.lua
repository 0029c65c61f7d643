-- Shared prelude, prepended to every script by store.py.
local TERMINAL = {completed = true, failed = true, cancelled = true, budget_exhausted = true}

local function emit(tree_key, events_key, ...)
  local maxlen = redis.call('HGET', tree_key, 'events_maxlen') or '10000'
  redis.call('XADD', events_key, 'MAXLEN', '~', maxlen, '*', ...)
end

local function num(v)
  return tonumber(v) or 0
end
