-- recover: give jobs whose lease expired (their worker died or went silent) back to `wait`, or fail them with
-- reason "stalled" once they have stalled more than `max_stalls` times. One checker acts per interval across
-- all workers: the first to take the `checker` lock.
--
-- KEYS[1] active   KEYS[2] tokens   KEYS[3] state    KEYS[4] wait     KEYS[5] failed   KEYS[6] errors
-- KEYS[7] stalls   KEYS[8] checker  KEYS[9] stats    KEYS[10] jobs    KEYS[11] results KEYS[12] attempts
-- KEYS[13] waiters  KEYS[14] marker
-- ARGV[1] checker id   ARGV[2] lock ms   ARGV[3] max stalls   ARGV[4] encoded "stalled" error
-- ARGV[5] keep failed count   ARGV[6] keep failed age ms (-1: no age limit)   ARGV[7] limit per call
-- Returns: {-1} if another checker holds the interval, else {recovered, failed, ids...}.
-- Errors: "QFLOW_CORRUPT <what>" when a key holds the wrong type; nothing was written but the lock.
-- A job whose stalls field is not a count fails alone (kind "corrupt"), counted in `failed`.
-- Jobs put back wake one idle fetcher (see _lib.lua), so they run at once, not at some fetcher's block_timeout.
--!include _lib.lua

local err = bad_types({KEYS[2], 'hash', KEYS[8], 'string'})
if err then return corrupt(err) end
-- First write not deny-oom, so recovery still runs at maxmemory (see renew.lua).
redis.call('HDEL', KEYS[2], '')
if not redis.call('SET', KEYS[8], ARGV[1], 'NX', 'PX', tonumber(ARGV[2])) then return {-1} end
err = bad_types({KEYS[1], 'zset', KEYS[3], 'hash', KEYS[4], 'list', KEYS[5], 'zset', KEYS[6], 'hash',
                 KEYS[7], 'hash', KEYS[9], 'hash', KEYS[10], 'hash', KEYS[11], 'hash', KEYS[12], 'hash',
                 KEYS[13], 'hash', KEYS[14], 'zset'})
if err then return corrupt(err) end
local now = now_ms()
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[7]))
local stalls = read_batched('HMGET', KEYS[7], expired)
local max_stalls = tonumber(ARGV[3])
local out = {0, 0}
local counts, requeued, states, errors, failed, done = {}, {}, {}, {}, {}, {}
for i, id in ipairs(expired) do
  local failure
  if not is_count(stalls[i], 9) then
    failure = corrupt_error('stalls', stalls[i])
  else
    local n = tonumber(stalls[i] or '0') + 1
    counts[#counts + 1] = id
    counts[#counts + 1] = n
    if n > max_stalls then failure = ARGV[4] end
  end
  states[#states + 1] = id
  if failure then
    states[#states + 1] = 'failed'
    errors[#errors + 1] = id
    errors[#errors + 1] = failure
    failed[#failed + 1] = now
    failed[#failed + 1] = id
    done[#done + 1] = id
    out[2] = out[2] + 1
  else
    states[#states + 1] = 'waiting'
    requeued[#requeued + 1] = id
    out[1] = out[1] + 1
  end
  out[#out + 1] = id
end

-- Write.
if #expired > 0 then
  call_batched('ZREM', KEYS[1], expired)
  call_batched('HDEL', KEYS[2], expired)
  call_batched('HSET', KEYS[7], counts)
  -- One RPUSH of several ids pushes them one after the other, as one RPUSH each did.
  call_batched('RPUSH', KEYS[4], requeued)
  call_batched('HSET', KEYS[3], states)
  if #requeued > 0 then wake_now(KEYS[14]) end
end
if out[2] > 0 then
  call_batched('HSET', KEYS[6], errors)
  call_batched('ZADD', KEYS[5], failed)
  -- A failed job is finished: a waiter's entry goes (the waiter sees the state at its next look).
  call_batched('HDEL', KEYS[13], done)
  bump(KEYS[9], {'stalled', #expired, 'failed', out[2]})
  trim(KEYS[5], tonumber(ARGV[5]), tonumber(ARGV[6]), now,
       {KEYS[10], KEYS[3], KEYS[6], KEYS[11], KEYS[12], KEYS[7], KEYS[13], KEYS[2]}, math.max(100, out[2]))
elseif #expired > 0 then
  bump(KEYS[9], {'stalled', #expired})
end
return out
