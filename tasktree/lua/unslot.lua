-- A model call ended, or a waiting call gave up its place: free its slot (or its place in
-- the queue). After a 429 (ARGV[2] = '429') cut the model's concurrency to half of what was
-- in flight, at most once a second, for ARGV[3] ms; after a success grow a cut back by 1/cap
-- (additive increase), and drop it once it reaches the limit. Then hand the free slots to
-- the queue's first live waiters: each is put in flight and woken by an entry on its own
-- grant list, so it calls at once, with no round trip to take the slot.
-- KEYS: slots, adapted, queue, queue lapse, calls in the last minute
-- ARGV: token, outcome ('200' answered, '429' rate limited, '0' failed or never made),
--       hold_ms, concurrency (0: none), rpm (0: none), lease_ms, grant key prefix
local now = now_ms()
local token, conc, rpm, lease = ARGV[1], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local in_flight = redis.call('ZCARD', KEYS[1])
redis.call('ZREM', KEYS[1], token)
if redis.call('ZREM', KEYS[3], token) == 1 then redis.call('ZREM', KEYS[4], token) end
redis.call('DEL', ARGV[7] .. token)  -- a slot handed over that its waiter no longer takes
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
if redis.call('EXISTS', KEYS[3]) == 0 then return in_flight end
local limit = model_limit(conc, KEYS[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local room = limit - redis.call('ZCARD', KEYS[1])
if limit == 0 then room = 64 end  -- no limit left (a cut that lapsed): wake them all
local minute = 0
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - 60000)
  minute = redis.call('ZCARD', KEYS[5])
end
local looked = 0
while room > 0 and looked < 64 and (rpm == 0 or minute < rpm) do
  local head = redis.call('ZPOPMIN', KEYS[3])
  if #head == 0 then break end
  looked = looked + 1
  local waiter = head[1]
  local lapse = tonumber(redis.call('ZSCORE', KEYS[4], waiter) or '0')
  redis.call('ZREM', KEYS[4], waiter)
  if lapse > now then
    redis.call('ZADD', KEYS[1], now + lease, waiter)
    if rpm > 0 then
      redis.call('ZADD', KEYS[5], now, waiter)
      minute = minute + 1
    end
    redis.call('RPUSH', ARGV[7] .. waiter, '1')
    redis.call('PEXPIRE', ARGV[7] .. waiter, 10000)
    room = room - 1
  end
end
if rpm > 0 then redis.call('PEXPIRE', KEYS[5], 61000) end
redis.call('PEXPIRE', KEYS[1], lease * 4)
return in_flight
