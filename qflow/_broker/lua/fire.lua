-- fire: create the job of one schedule's tick and move the schedule's cursor on, in one step, only if the
-- cursor still stands where the caller saw it (compare-and-set): whichever worker process fires a tick first
-- creates its job; every other attempt at that tick, from any process on any host, finds the cursor moved.
--
-- KEYS[1] jobs   KEYS[2] state   KEYS[3] wait   KEYS[4] meta   KEYS[5] schedule_next   KEYS[6] schedule_state
-- KEYS[7] marker (the queue's wake-ups: a created job wakes one idle fetcher)
-- ARGV[1] schema version   ARGV[2] schedule id   ARGV[3] the schedule's version the caller computed with
-- ARGV[4] cursor: the schedule's next tick as the caller read it (ms)
-- ARGV[5] tick: the due tick the job is for (ms; >= cursor, <= the server's now)
-- ARGV[6] next tick (ms, > tick), or 0 when the schedule has no more ticks
-- ARGV[7] ticks skipped from the cursor up to the tick (they get no job)
-- ARGV[8] grace (ms): create the job only if now - tick <= grace; -1: however late (misfire run_once)
-- ARGV[9] the job's id (derived from schedule id and tick: a second try at the same tick adds nothing)
-- Returns: {1, created (1/0), now} fired: the cursor moved to the next tick;
--          {0, version or false, cursor or false} stale: the schedule changed, went, or another process fired;
--          {2, ms until the tick} the server's clock has not reached the tick yet: nothing written.
-- Errors: "QFLOW_SCHEMA <stored>" for another schema; "QFLOW_CORRUPT <what>" for a key of the wrong type or a
-- corrupt counter; "QFLOW_BAD_ARGS <what>" for ticks out of order. Nothing was written in any of these cases.
--!include _lib.lua

local id = ARGV[2]
local stored, wrong = checked(redis.pcall('HGET', KEYS[4], 'schema'), KEYS[4])
if wrong then return corrupt(wrong) end
if stored and stored ~= ARGV[1] then
  return redis.error_reply('QFLOW_SCHEMA ' .. stored)
end
local err = bad_types({KEYS[2], 'hash', KEYS[3], 'list', KEYS[5], 'zset', KEYS[6], 'hash', KEYS[7], 'zset'})
if err then return corrupt(err) end

-- Compare: the version and the cursor the caller computed with.
local state = redis.call('HMGET', KEYS[6], 'ver:' .. id, 'env:' .. id, 'fired:' .. id, 'missed:' .. id)
local cursor = redis.call('ZSCORE', KEYS[5], id)
if state[1] ~= ARGV[3] or not cursor or tonumber(cursor) ~= tonumber(ARGV[4]) then
  return {0, state[1], cursor}
end
local tick, nxt, skipped, grace = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
if not (tick and nxt and skipped and grace) or tick < tonumber(cursor) or (nxt ~= 0 and nxt <= tick)
    or skipped < 0 then
  return redis.error_reply('QFLOW_BAD_ARGS fire of schedule ' .. shown(id) .. ': cursor ' .. cursor ..
                           ', tick ' .. ARGV[5] .. ', next ' .. ARGV[6] .. ', skipped ' .. ARGV[7])
end
local now = now_ms()
if now < tick then return {2, tick - now} end
if not state[2] then return corrupt('key ' .. KEYS[6] .. ': schedule ' .. shown(id) .. ' has no envelope') end
for i = 3, 4 do
  if not is_count(state[i], 15) then
    return corrupt('key ' .. KEYS[6] .. ': counter of schedule ' .. shown(id) .. ' is ' .. shown(state[i]))
  end
end

-- Write: the job (as add.lua creates a job that waits at once), then the cursor.
local created = 0
local run = grace < 0 or now - tick <= grace
if run then
  -- Only this first write can meet `jobs` of the wrong type (or out of memory): then nothing was written.
  local fresh, bad = checked(redis.pcall('HSETNX', KEYS[1], ARGV[9], state[2]), KEYS[1])
  if bad then return corrupt(bad) end
  if fresh == 1 then
    created = 1
    redis.call('LPUSH', KEYS[3], ARGV[9])
    redis.call('HSET', KEYS[2], ARGV[9], 'waiting')
    -- The one place a scheduled job becomes waiting: it wakes one idle fetcher (BZPOPMIN on the marker).
    wake_now(KEYS[7])
  end
end
if nxt > 0 then
  redis.call('ZADD', KEYS[5], nxt, id)
else
  redis.call('ZREM', KEYS[5], id)
end
redis.call('HSET', KEYS[6], 'last:' .. id, tick)
redis.call('HINCRBY', KEYS[6], 'fired:' .. id, created)
redis.call('HINCRBY', KEYS[6], 'missed:' .. id, skipped + (run and 0 or 1))
if not stored then redis.call('HSET', KEYS[4], 'schema', ARGV[1]) end
return {1, created, now}
