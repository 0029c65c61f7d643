-- A model call ended: free its slot. After a 429 (ARGV[2] = '429') cut the model's
-- concurrency to half of what was in flight, at most once a second, for ARGV[3] ms; after a
-- success grow a cut back by 1/cap (additive increase), and drop it once it reaches the limit.
-- A call waiting for a slot (only a configured or cut concurrency makes one wait) is woken:
-- an entry on the freed list.
-- KEYS: slots, adapted, freed ; ARGV: token, outcome ('200' answered, '429' rate limited, '0' failed), hold_ms, concurrency (0: none)
local now = now_ms()
local in_flight = redis.call('ZCARD', KEYS[1])
local freed = redis.call('ZREM', KEYS[1], ARGV[1]) == 1
local conc = tonumber(ARGV[4])
if ARGV[2] == '429' then
  local cut_at = tonumber(redis.call('HGET', KEYS[2], 'cut_at') or '0')
  if now - cut_at >= 1000 then
    local cap = tonumber(redis.call('HGET', KEYS[2], 'cap') or '') or in_flight
    if conc > 0 then cap = math.min(cap, conc) end
    cap = math.max(1, math.min(cap, in_flight) / 2)
    redis.call('HSET', KEYS[2], 'cap', tostring(cap), 'cut_at', tostring(now))
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
  end
elseif ARGV[2] == '200' then
  local cap = tonumber(redis.call('HGET', KEYS[2], 'cap') or '')
  if cap then
    cap = cap + 1 / cap
    if conc > 0 and cap >= conc then redis.call('DEL', KEYS[2])
    else redis.call('HSET', KEYS[2], 'cap', tostring(cap)) end
  end
end
if freed and (conc > 0 or redis.call('EXISTS', KEYS[2]) == 1) then
  redis.call('LPUSH', KEYS[3], '1')
  redis.call('LTRIM', KEYS[3], 0, 15)
  redis.call('PEXPIRE', KEYS[3], 10000)
end
return in_flight
