"""The Redis side of the distributed gate: one Lua script, one atomic step per call.

Data model (every key carries the hash tag ``{sg:<gate>}``, so a gate lives in one
Redis Cluster slot):

``sg:{<gate>}:meta`` (hash)
    ``cap`` the global capacity; ``epoch`` a random id made when the gate was created
    (a new one means Redis lost the gate's state); ``seq`` and ``fence`` the last arrival
    number and fencing token handed out; ``ver`` bumped by every state change (the
    pub/sub stream's sequence number); ``recover`` a Redis time (ms) before which
    nothing is admitted from the queue (set when the gate is re-created after a loss,
    so the live holders can re-register first).
``sg:{<gate>}:queue`` (sorted set)
    member -> arrival number: the global FIFO, lowest first.
``sg:{<gate>}:qexp`` (sorted set)
    member -> lease expiry (Redis ms) of each queued entry.
``sg:{<gate>}:holders`` (sorted set)
    member -> lease expiry (Redis ms) of each slot held: its size is the active count.
``sg:{<gate>}:fences`` (hash)
    member -> the fencing token of its slot.
``sg:{<gate>}:gone`` (sorted set)
    member -> until when (Redis ms) an enqueue of it is refused: members whose process
    gave up on an unanswered enqueue.

Arrival numbers are arrival times on Redis's clock, in µs: the enqueue step gets each
ticket's age (how long ago it arrived, by its own process's monotonic clock) and
places it at ``TIME - age``, so a place is fixed by when the session arrived, not by
when its enqueue reached Redis. Fencing tokens are ``max(last + 1, TIME in µs)``: they
only grow within one Redis lifetime, and keep growing after Redis restarts empty (its
clock went on), so a downstream store never sees them go backwards.

Every call reads ``TIME`` once; no client clock is ever written to Redis. A call first
re-creates the gate if it is missing, then reaps lapsed leases, then does its step,
then admits from the head of the queue while a slot is free ("the head of the queue
always gets the next slot"), and finally, if anything changed, bumps ``ver`` and
publishes one message describing the change on ``sg:{<gate>}:events``::

    V <ver> <active> <queued> <cap> <next deadline ms or -1> <now ms>
    E <seq> <member>            entered the queue
    D <member>                  left the queue without a slot (cancelled, lapsed)
    G <member> <fence> <exp ms> left the queue with a slot (a hand-off)

Each call returns ``[ver, active, queued, cap, next, now, epoch, events, ...]`` (numbers
as decimal strings; ``events`` the same lines as the message), then its own results.
"""

from __future__ import annotations

from typing import Final

#: ARGV: 1 channel, 2 capacity to create the gate with (the caller's last known global
#: capacity, so a gate Redis lost comes back as it was), 3 lease TTL (ms), 4 the epoch
#: the caller knew ('' if none), 5 a fresh epoch to use if the gate must be created,
#: 6 the operation, 7... its arguments.
GATE_LUA: Final = r"""
local K_META, K_QUEUE, K_QEXP, K_HOLDERS, K_FENCES = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local K_GONE = KEYS[6]
local channel = ARGV[1]
local ttl = tonumber(ARGV[3])
local op = ARGV[6]

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(now_us / 1000)
local events = {}
local changed = false

local function fmt(x) return string.format('%.0f', x) end

-- The gate's settings, creating the gate if it is missing.
local cap, epoch, recover
local stored = redis.call('HMGET', K_META, 'cap', 'epoch', 'recover')
if stored[1] then
  cap, epoch, recover = tonumber(stored[1]), stored[2], tonumber(stored[3])
else
  cap, epoch, recover = tonumber(ARGV[2]), ARGV[5], 0
  if ARGV[4] ~= '' then
    -- A caller knew this gate: Redis lost its state. Admit nobody new for one TTL so
    -- that every live holder can re-register first (the cap is never exceeded).
    recover = now + ttl
  end
  redis.call('HSET', K_META, 'cap', fmt(cap), 'epoch', epoch, 'seq', '0', 'fence', '0',
             'ver', '0', 'recover', fmt(recover))
  changed = true
end

local function next_id(field)
  local last = tonumber(redis.call('HGET', K_META, field)) or 0
  local id = math.max(last + 1, now_us)
  redis.call('HSET', K_META, field, fmt(id))
  return id
end

local function raise_to(field, value)
  local last = tonumber(redis.call('HGET', K_META, field)) or 0
  if value > last then redis.call('HSET', K_META, field, fmt(value)) end
end

-- Lapsed leases go first: a dead holder's slot and a dead waiter's place.
local function reap()
  redis.call('ZREMRANGEBYSCORE', K_GONE, '-inf', now)
  local dead = redis.call('ZRANGEBYSCORE', K_HOLDERS, '-inf', now)
  for _, m in ipairs(dead) do
    redis.call('ZREM', K_HOLDERS, m)
    redis.call('HDEL', K_FENCES, m)
    changed = true
  end
  local gone = redis.call('ZRANGEBYSCORE', K_QEXP, '-inf', now)
  for _, m in ipairs(gone) do
    redis.call('ZREM', K_QEXP, m)
    redis.call('ZREM', K_QUEUE, m)
    events[#events + 1] = 'D ' .. m
    changed = true
  end
end

local function take_slot(m, lease_end)
  local fence = next_id('fence')
  local exp = lease_end or (now + ttl)
  redis.call('ZADD', K_HOLDERS, exp, m)
  redis.call('HSET', K_FENCES, m, fmt(fence))
  changed = true
  return fence, exp
end

-- Invariant: after this, either the queue is empty or every slot is taken.
local function admit()
  if now < recover then return end
  local active = redis.call('ZCARD', K_HOLDERS)
  while active < cap do
    local head = redis.call('ZRANGE', K_QUEUE, 0, 0)
    if #head == 0 then break end
    local m = head[1]
    -- A waiter's first slot lease ends where its queue lease did (at least a third of
    -- a TTL from now, at most a TTL): a live waiter renews its queue lease every third
    -- of a TTL and its slot lease within one, while the entry of a process that died
    -- gets no more life than it had left, so its slot comes back within about a TTL
    -- of the death, not two.
    local qexp = tonumber(redis.call('ZSCORE', K_QEXP, m))
    local lease_end = nil
    if qexp then lease_end = math.min(now + ttl, math.max(qexp, now + math.floor(ttl / 3))) end
    redis.call('ZREM', K_QUEUE, m)
    redis.call('ZREM', K_QEXP, m)
    local fence, exp = take_slot(m, lease_end)
    events[#events + 1] = 'G ' .. m .. ' ' .. fmt(fence) .. ' ' .. fmt(exp)
    active = active + 1
  end
end

local function held(m)
  local exp = redis.call('ZSCORE', K_HOLDERS, m)
  if not exp then return nil end
  return {redis.call('HGET', K_FENCES, m) or '0', exp}
end

local function finish(extra)
  local ver = tonumber(redis.call('HGET', K_META, 'ver'))
  if changed then
    ver = ver + 1
    redis.call('HSET', K_META, 'ver', fmt(ver))
  end
  local active = redis.call('ZCARD', K_HOLDERS)
  local queued = redis.call('ZCARD', K_QUEUE)
  local nxt = -1
  local h = redis.call('ZRANGE', K_HOLDERS, 0, 0, 'WITHSCORES')
  if #h > 0 then nxt = tonumber(h[2]) end
  local q = redis.call('ZRANGE', K_QEXP, 0, 0, 'WITHSCORES')
  if #q > 0 and (nxt < 0 or tonumber(q[2]) < nxt) then nxt = tonumber(q[2]) end
  if recover > now and (nxt < 0 or recover < nxt) then nxt = recover end
  local body = table.concat(events, '\n')
  local header = 'V ' .. fmt(ver) .. ' ' .. active .. ' ' .. queued .. ' ' .. fmt(cap) .. ' '
                 .. fmt(nxt) .. ' ' .. fmt(now)
  if changed then
    if body ~= '' then header = header .. '\n' .. body end
    redis.call('PUBLISH', channel, header)
  end
  local out = {fmt(ver), tostring(active), tostring(queued), fmt(cap), fmt(nxt), fmt(now),
               epoch, body}
  for _, v in ipairs(extra) do out[#out + 1] = v end
  return out
end

reap()
local extra = {}

if op == 'enqueue' then
  -- ARGV 7: count, then per member, in arrival order: member, wait ('1'/'0'),
  -- max_queue, arrival: '@' and its time on Redis's clock (µs), as its process maps its
  -- own clock onto Redis's, or else its age (µs since it arrived, by that clock).
  -- Results per member: 'G' fence exp | 'Q' seq | 'W' (would wait) | 'F' (queue full).
  -- A queued member's arrival number is its arrival time on Redis's clock (never later
  -- than now), so its place is fixed by when it arrived, not by when its enqueue reached
  -- Redis; strictly increasing within a batch (which comes in arrival order).
  admit()
  local n = tonumber(ARGV[7])
  local last_seq = 0
  for i = 0, n - 1 do
    local m, wait = ARGV[8 + 4 * i], ARGV[9 + 4 * i]
    local maxq, arrival = tonumber(ARGV[10 + 4 * i]), ARGV[11 + 4 * i]
    if string.sub(arrival, 1, 1) == '@' then
      arrival = math.min(tonumber(string.sub(arrival, 2)), now_us)
    else
      arrival = now_us - tonumber(arrival)
    end
    local seq = redis.call('ZSCORE', K_QUEUE, m)
    local slot = held(m)
    if redis.call('ZSCORE', K_GONE, m) then
      -- Forgotten by its process (the answer was lost): never queue it late.
      extra[#extra + 1] = 'X'; extra[#extra + 1] = ''; extra[#extra + 1] = ''
    elseif seq then
      extra[#extra + 1] = 'Q'; extra[#extra + 1] = seq; extra[#extra + 1] = ''
    elseif slot then
      extra[#extra + 1] = 'G'; extra[#extra + 1] = slot[1]; extra[#extra + 1] = slot[2]
    else
      local queued = redis.call('ZCARD', K_QUEUE)
      if now >= recover and queued == 0 and redis.call('ZCARD', K_HOLDERS) < cap then
        local fence, exp = take_slot(m)
        extra[#extra + 1] = 'G'; extra[#extra + 1] = fmt(fence); extra[#extra + 1] = fmt(exp)
      elseif wait ~= '1' then
        extra[#extra + 1] = 'W'; extra[#extra + 1] = ''; extra[#extra + 1] = ''
      elseif queued >= maxq then
        extra[#extra + 1] = 'F'; extra[#extra + 1] = ''; extra[#extra + 1] = ''
      else
        local s = math.max(arrival, last_seq + 1)
        last_seq = s
        raise_to('seq', s)
        redis.call('ZADD', K_QUEUE, s, m)
        redis.call('ZADD', K_QEXP, now + ttl, m)
        events[#events + 1] = 'E ' .. fmt(s) .. ' ' .. m
        changed = true
        extra[#extra + 1] = 'Q'; extra[#extra + 1] = fmt(s); extra[#extra + 1] = ''
      end
    end
  end
  admit()

elseif op == 'release' or op == 'forget' then
  -- ARGV 7...: members leaving, queued or holding (idempotent). With none: a tick.
  -- 'forget' (a waiter that leaves without having used a slot) also leaves a
  -- tombstone for a while: if an enqueue of it is still on its way (a stalled Redis, a
  -- slow network, a cancel during the call), it is refused when it runs, instead of
  -- leaving a ghost at the head of the queue.
  for i = 7, #ARGV do
    local m = ARGV[i]
    if op == 'forget' then
      redis.call('ZADD', K_GONE, now + math.max(ttl, 60000), m)
    end
    if redis.call('ZREM', K_HOLDERS, m) == 1 then
      redis.call('HDEL', K_FENCES, m)
      changed = true
    end
    if redis.call('ZREM', K_QUEUE, m) == 1 then
      redis.call('ZREM', K_QEXP, m)
      events[#events + 1] = 'D ' .. m
      changed = true
    end
  end
  admit()

elseif op == 'renew' then
  -- ARGV 7 member, 8 the epoch its slot was granted in, 9 its fence, 10 the latest
  -- expiry it may give (Redis ms: a TTL after the latest instant the holder can have
  -- sent it; '' for none). Result: 'OK' exp epoch | 'LOST'. A slot missing because
  -- Redis lost the gate is re-registered if a slot is free (never above the cap).
  -- The bound: a renewal that reaches Redis late (sent while Redis stalled, and run
  -- when it resumed, after its holder had died or given the session up) extends the
  -- lease no further than a TTL from when it was sent, never a TTL from now.
  local m = ARGV[7]
  local exp = now + ttl
  if ARGV[10] and ARGV[10] ~= '' then
    exp = math.min(exp, tonumber(ARGV[10]))
  end
  local current = redis.call('ZSCORE', K_HOLDERS, m)
  if current and exp <= now then
    extra = {'LOST', '', ''}  -- too late to renew anything: nobody waits for it now
  elseif current then
    exp = math.max(exp, tonumber(current))  -- a renewal never shortens a lease
    redis.call('ZADD', K_HOLDERS, 'XX', exp, m)
    extra = {'OK', fmt(exp), epoch}
  elseif exp > now and epoch ~= ARGV[8] and redis.call('ZCARD', K_HOLDERS) < cap then
    local fence = tonumber(ARGV[9])
    redis.call('ZADD', K_HOLDERS, exp, m)
    redis.call('HSET', K_FENCES, m, ARGV[9])
    raise_to('fence', fence)
    changed = true
    extra = {'OK', fmt(exp), epoch}
  else
    extra = {'LOST', '', ''}
  end
  admit()

elseif op == 'renew_queue' then
  -- ARGV 7: the latest expiry it may give (as for 'renew': a TTL after the latest
  -- instant the process can have sent it; '' for none). ARGV 8...: this process's
  -- waiters. Results per member: 'Q' (lease extended) | 'G' fence exp (a hand-off
  -- this process has not heard of) | 'M' (missing: its lease lapsed, or Redis lost the
  -- gate; the process enqueues it again). Never inserts anything, so a renewal that
  -- runs late cannot leave a ghost; bounded, it cannot keep a dead process's places
  -- (and a slot handed to one) a TTL from when Redis resumed either.
  local exp = now + ttl
  if ARGV[7] ~= '' then
    exp = math.min(exp, tonumber(ARGV[7]))
  end
  for i = 8, #ARGV do
    local m = ARGV[i]
    local slot = held(m)
    -- A place whose lease has lapsed is gone already (reap): one still here is valid,
    -- and a renewal that comes too late (its bound past) leaves it as it is.
    if redis.call('ZSCORE', K_QUEUE, m) then
      local current = tonumber(redis.call('ZSCORE', K_QEXP, m) or '0')
      redis.call('ZADD', K_QEXP, 'XX', math.max(exp, current), m)  -- never shortened
      extra[#extra + 1] = 'Q'; extra[#extra + 1] = ''; extra[#extra + 1] = ''
    elseif slot then
      extra[#extra + 1] = 'G'; extra[#extra + 1] = slot[1]; extra[#extra + 1] = slot[2]
    else
      extra[#extra + 1] = 'M'; extra[#extra + 1] = ''; extra[#extra + 1] = ''
    end
  end
  admit()

elseif op == 'resize' then
  cap = tonumber(ARGV[7])
  redis.call('HSET', K_META, 'cap', fmt(cap))
  changed = true
  admit()

elseif op == 'snapshot' then
  -- The whole queue (member, seq, ...) and every slot (member, fence, exp, ...), for a
  -- listener that (re)subscribed and must rebuild its mirror.
  admit()
  local q = redis.call('ZRANGE', K_QUEUE, 0, -1, 'WITHSCORES')
  local h = redis.call('ZRANGE', K_HOLDERS, 0, -1, 'WITHSCORES')
  extra[1] = tostring(#q / 2)
  for _, v in ipairs(q) do extra[#extra + 1] = v end
  for i = 1, #h, 2 do
    extra[#extra + 1] = h[i]
    extra[#extra + 1] = redis.call('HGET', K_FENCES, h[i]) or '0'
    extra[#extra + 1] = h[i + 1]
  end

else
  return redis.error_reply('sessiongate: unknown operation ' .. tostring(op))
end

return finish(extra)
"""
