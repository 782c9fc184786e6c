-- add: create jobs, unless a job with the same id already exists (idempotent `job_id=`).
--
-- KEYS[1] jobs    KEYS[2] state    KEYS[3] wait    KEYS[4] delayed    KEYS[5] meta    KEYS[6] marker
-- KEYS[7] timer   KEYS[8] expires
-- ARGV[1] schema version   ARGV[2] fields per job: 4, or 6 when some job of the call expires
-- ARGV[3..] groups of 4 or 6: id, envelope, delay_ms (relative, 0 = none), run_at_ms (absolute, 0 = none),
--   [expires_in_ms (relative, 0 = none), expires_at_ms (absolute, 0 = none)]
-- Returns: one integer per job, 1 = created, 0 = an existing job kept that id.
-- Errors: "QFLOW_SCHEMA <stored>" when the queue was written by an incompatible schema; "QFLOW_CORRUPT <what>"
-- when a key holds the wrong type. Either way nothing was written.
-- The writes after the idempotency check go out once per batch, not once per job, and the server clock is read
-- only when some job has a delay or a run_at: a redis.call's fixed cost dominated an add's server CPU (issue
-- #6). HSETNX stays per job: an HMGET of the batch would copy the envelope of every job that already exists
-- into the script's memory (a retried add_bulk: up to 500 of them, 1 MiB each).
-- Wake-ups (see _lib.lua): a job waiting at once wakes one idle fetcher ('now'); a delayed job due before every
-- other wakes one to time its wait to it ('due'), so it starts on time whatever block_timeout is (issue 14).
-- Expiry (issue 14): a job created with an expiry gets its deadline (ms, server clock) in `expires`; the claim
-- discards it as `expired` if it reaches it at or after that deadline. An existing job keeps its own.
--!include _lib.lua

local stored, wrong = checked(redis.pcall('HGET', KEYS[5], 'schema'), KEYS[5])
if wrong then return corrupt(wrong) end
if stored and stored ~= ARGV[1] then
  return redis.error_reply('QFLOW_SCHEMA ' .. stored)
end

-- A job with neither delay nor run_at waits at once, whatever the time: only the others need TIME.
-- Two more fields per job only when some job expires: a plain add sends (and parses) no more than before.
local step = tonumber(ARGV[2])
local expiring = step == 6
local now = 0
for i = 3, #ARGV, step do
  if tonumber(ARGV[i + 2]) > 0 or tonumber(ARGV[i + 3]) > 0 or (expiring and tonumber(ARGV[i + 4]) > 0) then
    now = now_ms()
    break
  end
end
-- The keys written after the first HSETNX (which names `jobs` itself if that key is of the wrong type).
local err = bad_types({KEYS[2], 'hash', KEYS[3], 'list', KEYS[6], 'zset'})
if not err and now > 0 then err = bad_types({KEYS[4], 'zset'}) end
if not err and expiring then err = bad_types({KEYS[8], 'hash'}) end
if err then return corrupt(err) end
local earliest = nil
if now > 0 then earliest = earliest_due(KEYS[4]) end

local out = {}
local waiting, delayed, states, deadlines = {}, {}, {}, {}
local soonest = nil  -- the earliest due time of the jobs delayed here
for i = 3, #ARGV, step do
  local id = ARGV[i]
  -- Only the first HSETNX can meet a key of the wrong type (or out of memory), and then nothing was written.
  local created, wrong = checked(redis.pcall('HSETNX', KEYS[1], id, ARGV[i + 1]), KEYS[1])
  if wrong then return corrupt(wrong) end
  if created == 1 then
    local at = tonumber(ARGV[i + 3])
    local delay = tonumber(ARGV[i + 2])
    if delay > 0 then at = now + delay end
    states[#states + 1] = id
    if expiring then
      local expires_at = tonumber(ARGV[i + 5])
      local expires_in = tonumber(ARGV[i + 4])
      if expires_in > 0 then expires_at = now + expires_in end
      if expires_at > 0 then
        deadlines[#deadlines + 1] = id
        deadlines[#deadlines + 1] = expires_at
      end
    end
    if at > now then
      if not soonest or at < soonest then soonest = at end
      delayed[#delayed + 1] = at
      delayed[#delayed + 1] = id
      states[#states + 1] = 'delayed'
    else
      waiting[#waiting + 1] = id
      states[#states + 1] = 'waiting'
    end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
-- One LPUSH of several ids pushes them one after the other, as one LPUSH each did: the same order in `wait`.
call_batched('LPUSH', KEYS[3], waiting)
call_batched('ZADD', KEYS[4], delayed)
call_batched('HSET', KEYS[2], states)
call_batched('HSET', KEYS[8], deadlines)
if not stored then redis.call('HSET', KEYS[5], 'schema', ARGV[1]) end
if #waiting > 0 then wake_now(KEYS[6]) end
if soonest then wake_due(KEYS[6], KEYS[7], earliest, soonest) end
return out
