-- claim: promote due delayed jobs, then move up to `count` waiting jobs into `active`, each under a new lease.
--
-- KEYS[1] wait    KEYS[2] active    KEYS[3] delayed    KEYS[4] jobs    KEYS[5] state
-- KEYS[6] tokens  KEYS[7] attempts  KEYS[8] stalls     KEYS[9] seq
-- KEYS[10] failed KEYS[11] errors   KEYS[12] stats     KEYS[13] waiters   KEYS[14] marker   KEYS[15] timer
-- KEYS[16] results KEYS[17] expires KEYS[18] expired
-- ARGV[1] count    ARGV[2] lease_ms    ARGV[3] promote limit
-- ARGV[4] largest envelope a worker accepts, bytes ('' or missing: any)   ARGV[5] encoded error for a larger one
-- ARGV[6] fetcher id ('' or missing: the caller times no wait; the reply names the next due time as it is)
-- ARGV[7] slots the fetcher keeps free beside this claim   ARGV[8] the fetcher's longest idle wait, ms
-- ARGV[9] failed jobs kept (count; '' or missing: no trim here)   ARGV[10] their age limit, ms (-1: none)
-- A job whose envelope is larger fails here (kind "payload") instead of travelling: one huge reply would
-- outlast the leases of every job claimed with it (tests/faults: a 50 MB job took its batch down).
-- A job whose attempts or stalls field is not a count fails here too (kind "corrupt", the field and its value
-- in the message); the rest of the batch is leased.
-- Expiry (issue 14): a job whose deadline in `expires` is at or before now is not leased: it becomes `expired`
-- (in the `expired` set, counted in stats.expired), never run. A delayed job is checked when it is due, so
-- one whose deadline passed before its due time expires then. A job leased in time loses its deadline: the
-- deadline is for the first start, and a started job retries and recovers as any other (docs/scheduling.md). Jobs failed or expired here are trimmed from
-- `failed` and `expired` by the failed retention (ARGV[9], ARGV[10]): a flood of corrupt or expired jobs
-- never grows either set past it (issue 12 leftover).
-- Returns: { ms the caller waits at most for the next delayed job (-1: none delayed, or another fetcher times
--   that wait), waiting jobs left, packed jobs }
--   packed jobs: one string, per job a 20-byte head struct '>I4I4I4I4I4' (id length, token length, envelope
--   length, attempts spent, stalls) then the id, token and envelope bytes. One reply element for the whole
--   batch instead of five per job: the client's reply parser was a third of a worker's CPU (issue #6).
-- Errors: "QFLOW_CORRUPT <what>" when a key holds the wrong type or `seq` is not a token counter; nothing
--   was written (no job left `wait`).
-- A job id whose envelope is gone (deleted by hand) is dropped from `wait` and not returned.
-- Wake-ups and the timer (issue 14; see _lib.lua): jobs left waiting re-arm 'now', so another idle fetcher
-- helps, and a wake-up popped by a fetcher that died before its claim is not lost for good. With a fetcher
-- id, the caller is told the next due time only if it holds the queue's timer: it will wait idle after this
-- claim (nothing left waiting, a slot free) and no other fetcher holds it; it then holds it for its wait plus
-- one more. One fetcher, not every idle one, wakes at each due time. A holder that will not wait idle (its
-- slots are full) hands the role on with a 'due' wake-up. The timer writes tolerate out-of-memory: an
-- empty claim at maxmemory still answers (it writes nothing else).
-- Each hash is read and written once per batch (HMGET, HSET f v f v..., ZADD s m s m...), not once per job:
-- a redis.call's fixed cost dominated the server CPU of a claim (issue #6). Reads come first and every write
-- after them (see _lib.lua): the ids are read off the tail of `wait` with LRANGE, and popped with LTRIM only
-- once the batch is decided.
--!include _lib.lua

local now = now_ms()
local count = tonumber(ARGV[1])

-- Check: the keys written and not read below, and the token counter.
local err = bad_types({KEYS[2], 'zset', KEYS[5], 'hash', KEYS[6], 'hash', KEYS[14], 'zset'})
if err then return corrupt(err) end
local fetcher = ARGV[6] or ''
local holder = false
if fetcher ~= '' then
  holder, err = checked(redis.pcall('GET', KEYS[15]), KEYS[15])
  if err then return corrupt(err) end
end
local seq, wrong = checked(redis.pcall('GET', KEYS[9]), KEYS[9])
if wrong then return corrupt(wrong) end
if not is_count(seq, 15) then
  return corrupt('key ' .. KEYS[9] .. ' holds ' .. shown(seq) ..
                 ', not a token counter (a whole number of at most 15 digits)')
end

-- Read: the due delayed jobs, and the tail of `wait`.
local due
due, err = checked(redis.pcall('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3])),
                   KEYS[3])
if err then return corrupt(err) end
local tail = {}
if count > 0 then
  tail, err = checked(redis.pcall('LRANGE', KEYS[1], -count, -1), KEYS[1])
  if err then return corrupt(err) end
end
-- The ids in the order RPOP would give them after the due jobs were LPUSHed: the tail of `wait` from the
-- right, then the due jobs in due order. Due jobs not taken go to `wait` as the promotion would put them.
local from_wait = #tail
local ids = {}
for i = from_wait, 1, -1 do ids[#ids + 1] = tail[i] end
local promoted = {}
for _, id in ipairs(due) do
  if #ids < count then ids[#ids + 1] = id else promoted[#promoted + 1] = id end
end

local out = {-1, 0, ''}
local n_expiring = 0
local packed = {}
local leased, tokens, states, gone, failed, errors, expired = {}, {}, {}, {}, {}, {}, {}
for _, id in ipairs(promoted) do
  states[#states + 1] = id
  states[#states + 1] = 'waiting'
end
if #ids > 0 then
  local last = tonumber(seq or '0') + #ids
  -- tostring prints 14 significant digits: past that, '%.0f' prints every digit of a whole number < 2^53.
  local text = tostring
  if last >= 1e14 then text = function(n) return string.format('%.0f', n) end end
  local deadline = now + tonumber(ARGV[2])
  local largest = tonumber(ARGV[4])
  -- Nothing below writes these hashes, so one read per batch sees what a read per job would have seen.
  -- An oversize envelope is read into the script's memory here, but never put in the reply.
  local envs, attempts, stalls
  envs, err = read_batched('HMGET', KEYS[4], ids)
  if not envs then return corrupt(err) end
  attempts, err = read_batched('HMGET', KEYS[7], ids)
  if not attempts then return corrupt(err) end
  stalls, err = read_batched('HMGET', KEYS[8], ids)
  if not stalls then return corrupt(err) end
  -- Most queues hold no expiring job: one HLEN spares them the HMGET.
  local deadlines = {}
  n_expiring, err = checked(redis.pcall('HLEN', KEYS[17]), KEYS[17])
  if err then return corrupt(err) end
  if n_expiring > 0 then
    deadlines, err = read_batched('HMGET', KEYS[17], ids)
    if not deadlines then return corrupt(err) end
  end
  for i, id in ipairs(ids) do
    local env = envs[i]
    local failure
    -- The same tests in the same order as HSTRLEN (0 for a missing field) then HGET.
    if largest and (env and #env or 0) > largest then
      failure = ARGV[5]
    elseif not env then
      gone[#gone + 1] = id
    elseif deadlines[i] and not is_count(deadlines[i], 15) then
      failure = corrupt_error('expiry deadline', deadlines[i], '999999999999999')
    elseif deadlines[i] and tonumber(deadlines[i]) <= now then
      states[#states + 1] = id
      states[#states + 1] = 'expired'
      expired[#expired + 1] = now
      expired[#expired + 1] = id
    elseif not is_count(attempts[i], 9) then
      failure = corrupt_error('attempts', attempts[i])
    elseif not is_count(stalls[i], 9) then
      failure = corrupt_error('stalls', stalls[i])
    else
      -- An id twice in one batch is leased twice, as before: the later token wins in `tokens`.
      local token = text(last - #ids + i)
      leased[#leased + 1] = deadline
      leased[#leased + 1] = id
      tokens[#tokens + 1] = id
      tokens[#tokens + 1] = token
      states[#states + 1] = id
      states[#states + 1] = 'active'
      packed[#packed + 1] = struct.pack('>I4I4I4I4I4', #id, #token, #env, tonumber(attempts[i] or '0'),
                                        tonumber(stalls[i] or '0')) .. id .. token .. env
    end
    if failure then
      states[#states + 1] = id
      states[#states + 1] = 'failed'
      errors[#errors + 1] = id
      errors[#errors + 1] = failure
      failed[#failed + 1] = now
      failed[#failed + 1] = id
    end
  end
  if #errors > 0 or #expired > 0 then
    err = bad_types({KEYS[10], 'zset', KEYS[11], 'hash', KEYS[12], 'hash', KEYS[13], 'hash', KEYS[16], 'hash',
                     KEYS[7], 'hash', KEYS[8], 'hash', KEYS[18], 'zset', KEYS[4], 'hash'})
    if err then return corrupt(err) end
  end
end

-- Write.
if #due > 0 then call_batched('ZREM', KEYS[3], due) end
-- One LPUSH of all of them pushes them in the same order as one LPUSH each.
call_batched('LPUSH', KEYS[1], promoted)
if from_wait > 0 then redis.call('LTRIM', KEYS[1], 0, -from_wait - 1) end
if #ids > 0 then
  redis.call('INCRBY', KEYS[9], #ids)
  call_batched('HDEL', KEYS[5], gone)
  call_batched('ZADD', KEYS[2], leased)
  call_batched('HSET', KEYS[6], tokens)
  if n_expiring > 0 then
    call_batched('HDEL', KEYS[17], gone)
    local started = {}
    for i = 1, #tokens, 2 do started[#started + 1] = tokens[i] end
    call_batched('HDEL', KEYS[17], started)
  end
end
call_batched('HSET', KEYS[5], states)
if #errors > 0 then
  call_batched('HSET', KEYS[11], errors)
  call_batched('ZADD', KEYS[10], failed)
  -- A failed job is finished: a waiter's entry goes (the waiter sees the state at its next look).
  local done = {}
  for i = 2, #failed, 2 do done[#done + 1] = failed[i] end
  call_batched('HDEL', KEYS[13], done)
  bump(KEYS[12], {'failed', #errors / 2})
end
if #expired > 0 then
  call_batched('ZADD', KEYS[18], expired)
  local done = {}
  for i = 2, #expired, 2 do done[#done + 1] = expired[i] end
  call_batched('HDEL', KEYS[13], done)
  call_batched('HDEL', KEYS[17], done)
  bump(KEYS[12], {'expired', #done})
end
local keep = tonumber(ARGV[9] or '')
if keep and (#errors > 0 or #expired > 0) then
  -- Every per-job field goes with a trimmed job; tokens, a claim-failed job has none.
  local owned = {KEYS[4], KEYS[5], KEYS[11], KEYS[16], KEYS[7], KEYS[8], KEYS[13], KEYS[6], KEYS[17]}
  local limit = math.max(100, #errors / 2 + #expired / 2)
  trim(KEYS[10], keep, tonumber(ARGV[10]), now, owned, limit)
  trim(KEYS[18], keep, tonumber(ARGV[10]), now, owned, limit)
end

local left = redis.call('LLEN', KEYS[1])
if left > 0 then tolerant('ZADD', KEYS[14], 0, 'now') end  -- wake_now, at maxmemory too
local nxt = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
if #nxt > 0 then out[1] = math.max(0, tonumber(nxt[2]) - now) end
if fetcher ~= '' then
  local mine = not holder or holder == fetcher
  local idle = left == 0 and (#leased / 2 < count or tonumber(ARGV[7]) > 0)
  if out[1] >= 0 and mine and idle then
    local hold = tonumber(ARGV[8])
    tolerant('SET', KEYS[15], fetcher, 'PX', math.min(out[1], hold) + hold)
  else
    if out[1] >= 0 and mine then
      -- This fetcher held the role, or could take it, but will not wait idle: the next idle one takes it.
      tolerant('ZADD', KEYS[14], 'LT', tonumber(nxt[2]), 'due')
    end
    if holder and holder == fetcher then redis.call('DEL', KEYS[15]) end
    out[1] = -1
  end
end
out[2] = left
out[3] = table.concat(packed)
return out
