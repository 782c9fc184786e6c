-- dedup: add jobs that carry a deduplication key (issue 14), one after the other, each seeing what the ones
-- before it did. A key is a string key of its own (`<prefix>:{<queue>}:dedup:<key>`) holding the id of the
-- job it last created or refreshed, with its own TTL (PX), independent of retention.
--
-- KEYS[1] jobs    KEYS[2] state    KEYS[3] wait    KEYS[4] delayed    KEYS[5] meta    KEYS[6] marker
-- KEYS[7] timer   KEYS[8] expires  KEYS[9..] the dedup keys of the jobs
-- ARGV[1] schema version
-- ARGV[2..] groups of 9: id, envelope, delay_ms (relative, 0 = none), run_at_ms (absolute, 0 = none),
--   expires_in_ms (relative, 0 = none), expires_at_ms (absolute, 0 = none), mode ('throttle' or 'debounce'),
--   ttl_ms, index in KEYS of the job's dedup key
-- Returns: per job two items, an outcome and the id of the job it names: 1 = created (this id), 0 = a job
--   with this id existed (kept), 2 = throttled (the job the key holds: nothing written), 3 = debounced (the
--   job the key holds, still waiting or delayed: its envelope replaced, its due time and expiry set anew from
--   this add, the key's TTL restarted).
-- Errors: "QFLOW_SCHEMA <stored>" when the queue was written by an incompatible schema; "QFLOW_CORRUPT <what>"
-- when a key holds the wrong type. Either way nothing was written.
-- Throttle: while the key lives, an add with it is ignored and answers the job that set it (whatever became
-- of that job). Debounce: while the key lives and its job has not started, an add replaces that job's
-- payload and options and pushes its due time (delay from now); once it started (or is gone), the add
-- creates a new job and the key names it. A debounced job that moves from `delayed` to `wait` (the new add
-- has no delay) goes to the back of the line; one that moves from `wait` to `delayed` is found with LREM,
-- which walks `wait` from the oldest end (O(waiting jobs)).
--!include _lib.lua

local stored, wrong = checked(redis.pcall('HGET', KEYS[5], 'schema'), KEYS[5])
if wrong then return corrupt(wrong) end
if stored and stored ~= ARGV[1] then
  return redis.error_reply('QFLOW_SCHEMA ' .. stored)
end
local checks = {KEYS[1], 'hash', KEYS[2], 'hash', KEYS[3], 'list', KEYS[4], 'zset', KEYS[6], 'zset',
                KEYS[8], 'hash'}
for i = 9, #KEYS do
  checks[#checks + 1] = KEYS[i]
  checks[#checks + 1] = 'string'
end
local err = bad_types(checks)
if err then return corrupt(err) end

local now = now_ms()
local earliest = earliest_due(KEYS[4])
local soonest = nil
local pushed = false
local out = {}

-- Where and when the job `id` goes (a new job, or a debounced one), and its expiry.
local function place(id, i, debounced_from)
  local at = tonumber(ARGV[i + 3])
  local delay = tonumber(ARGV[i + 2])
  if delay > 0 then at = now + delay end
  local expires_at = tonumber(ARGV[i + 5])
  local expires_in = tonumber(ARGV[i + 4])
  if expires_in > 0 then expires_at = now + expires_in end
  if expires_at > 0 then
    redis.call('HSET', KEYS[8], id, expires_at)
  elseif debounced_from then
    redis.call('HDEL', KEYS[8], id)
  end
  if at > now then
    if debounced_from == 'waiting' then redis.call('LREM', KEYS[3], -1, id) end
    redis.call('ZADD', KEYS[4], at, id)
    redis.call('HSET', KEYS[2], id, 'delayed')
    if not soonest or at < soonest then soonest = at end
  elseif debounced_from ~= 'waiting' then
    if debounced_from == 'delayed' then redis.call('ZREM', KEYS[4], id) end
    redis.call('LPUSH', KEYS[3], id)
    redis.call('HSET', KEYS[2], id, 'waiting')
    pushed = true
  end
end

for i = 2, #ARGV, 9 do
  local id = ARGV[i]
  local key = KEYS[tonumber(ARGV[i + 8])]
  local mode = ARGV[i + 6]
  local ttl = tonumber(ARGV[i + 7])
  local holder = redis.call('GET', key)
  local held_state = holder and redis.call('HGET', KEYS[2], holder)
  if holder and mode == 'throttle' then
    out[#out + 1] = 2
    out[#out + 1] = holder
  elseif holder and (held_state == 'waiting' or held_state == 'delayed') then
    redis.call('HSET', KEYS[1], holder, ARGV[i + 1])
    place(holder, i, held_state)
    redis.call('SET', key, holder, 'PX', ttl)
    out[#out + 1] = 3
    out[#out + 1] = holder
  elseif redis.call('HSETNX', KEYS[1], id, ARGV[i + 1]) == 1 then
    place(id, i, nil)
    redis.call('SET', key, id, 'PX', ttl)
    out[#out + 1] = 1
    out[#out + 1] = id
  else
    out[#out + 1] = 0
    out[#out + 1] = id
  end
end
if not stored then redis.call('HSET', KEYS[5], 'schema', ARGV[1]) end
if pushed then wake_now(KEYS[6]) end
if soonest then wake_due(KEYS[6], KEYS[7], earliest, soonest) end
return out
