-- complete: record the results of a batch of jobs, each only if its delivery is still current.
--
-- KEYS[1] active   KEYS[2] tokens   KEYS[3] state    KEYS[4] results   KEYS[5] completed
-- KEYS[6] jobs     KEYS[7] attempts KEYS[8] stalls   KEYS[9] errors    KEYS[10] waiters   KEYS[11] stats
-- KEYS[12..] the notify list of each job, in ARGV order
-- ARGV[1] keep count   ARGV[2] keep age ms (-1: no age limit)   ARGV[3] notify ttl ms
-- ARGV[4..] groups of 3: id, token, encoded result
-- Returns: one string with a byte per job, '1' = completed (now, or already by this very delivery: see
-- below), '0' = stale delivery (rejected, counted in stats.stale_acks). One reply element per batch keeps the
-- client's parsing off the hot path.
-- Errors: "QFLOW_CORRUPT <what>" when a key holds the wrong type; nothing was written.
-- Sent again (its reply was lost after this script ran, and the worker resends the ack): `tokens` keeps the
-- token of the delivery that completed a job until retention trims the job, so an ack whose token is still
-- stored for a job already `completed` is this delivery's own recorded outcome. It answers '1', writes
-- nothing and counts nothing. Tokens are unique (claim takes them from `seq`), so no other delivery can
-- match; the next claim of the id (after an operator's retry_failed) overwrites the token.
-- Leases are checked with one ZMSCORE and one HMGET per batch, and each hash is written once per batch: a
-- redis.call's fixed cost dominated the server CPU of an ack (issue #6). The state is read only for the
-- rare ack whose token is stored but whose lease is not current. Every check and read comes before the first
-- write (see _lib.lua). Retention trims at least as many jobs as the batch completed, so the completed set
-- stays within its count under load.
--!include _lib.lua

local now = now_ms()
local ids, tokens = {}, {}
for i = 4, #ARGV, 3 do
  ids[#ids + 1] = ARGV[i]
  tokens[#tokens + 1] = ARGV[i + 1]
end
-- lease_ok for the whole batch: active, deadline > now, token matches.
local deadlines, holders, err
deadlines, err = read_batched('ZMSCORE', KEYS[1], ids)
if not deadlines then return corrupt(err) end
holders, err = read_batched('HMGET', KEYS[2], ids)
if not holders then return corrupt(err) end

local out = {}
local done_ids, states, results, finished = {}, {}, {}, {}
local taken, notify_of = {}, {}  -- id -> the token that completed it in this batch; notify list (KEYS[12..])
local again = {}  -- positions of acks whose token is stored but whose lease is not current
local stale = 0
for j, id in ipairs(ids) do
  local deadline = deadlines[j]
  local token = tokens[j]
  if taken[id] then
    -- Completed earlier in this batch: as when each ack ran in turn, the same delivery again is recorded,
    -- another one stale.
    if taken[id] == token then
      out[j] = '1'
    else
      stale = stale + 1
      out[j] = '0'
    end
  elseif holders[j] ~= token then
    stale = stale + 1
    out[j] = '0'
  elseif deadline and tonumber(deadline) > now then
    taken[id] = token
    done_ids[#done_ids + 1] = id
    notify_of[#done_ids] = KEYS[11 + j]
    states[#states + 1] = id
    states[#states + 1] = 'completed'
    results[#results + 1] = id
    results[#results + 1] = ARGV[3 * j + 3]
    finished[#finished + 1] = now
    finished[#finished + 1] = id
    out[j] = '1'
  else
    again[#again + 1] = j
  end
end
if #again > 0 then
  -- This ack's token is stored, its lease is not current: recorded already if the job is `completed` (the
  -- ack is sent again), stale if it is still `active` (an expired lease not recovered yet).
  local which = {}
  for n, j in ipairs(again) do which[n] = ids[j] end
  local now_in
  now_in, err = read_batched('HMGET', KEYS[3], which)
  if not now_in then return corrupt(err) end
  for n, j in ipairs(again) do
    if now_in[n] == 'completed' then
      out[j] = '1'
    else
      stale = stale + 1
      out[j] = '0'
    end
  end
end
local done = #done_ids
local incs = {}
local woken = {}
if done > 0 then
  -- The keys written below (trim included), and the waiters of the jobs completed.
  err = bad_types({KEYS[3], 'hash', KEYS[4], 'hash', KEYS[5], 'zset', KEYS[6], 'hash', KEYS[7], 'hash',
                   KEYS[8], 'hash', KEYS[9], 'hash', KEYS[11], 'hash'})
  if err then return corrupt(err) end
  -- Someone awaits a result: rare, so one HLEN per batch and per-job work only for the awaited ones.
  local waiting
  waiting, err = checked(redis.pcall('HLEN', KEYS[10]), KEYS[10])
  if err then return corrupt(err) end
  if waiting > 0 then
    local awaited = read_batched('HMGET', KEYS[10], done_ids)
    for j, id in ipairs(done_ids) do
      if awaited[j] then woken[#woken + 1] = j end
    end
  end
  incs = {'completed', done}
else
  err = bad_types({KEYS[11], 'hash'})
  if err then return corrupt(err) end
end
if stale > 0 then
  incs[#incs + 1] = 'stale_acks'
  incs[#incs + 1] = stale
end

-- Write.
if done > 0 then
  call_batched('ZREM', KEYS[1], done_ids)
  -- `tokens` keeps each job's token (the one checked above) until the job is trimmed: see the header.
  call_batched('HSET', KEYS[3], states)
  call_batched('HSET', KEYS[4], results)
  call_batched('ZADD', KEYS[5], finished)
  if #woken > 0 then
    local gone = {}
    for _, j in ipairs(woken) do
      gone[#gone + 1] = done_ids[j]
      -- One element at most: whatever an earlier life of the id left there goes (a key of any type).
      local notify = notify_of[j]
      redis.call('DEL', notify)
      redis.call('LPUSH', notify, 'completed')
      redis.call('PEXPIRE', notify, tonumber(ARGV[3]))
    end
    call_batched('HDEL', KEYS[10], gone)
  end
end
bump(KEYS[11], incs)
if done > 0 then
  trim(KEYS[5], tonumber(ARGV[1]), tonumber(ARGV[2]), now,
       {KEYS[6], KEYS[3], KEYS[4], KEYS[9], KEYS[7], KEYS[8], KEYS[10], KEYS[2]}, math.max(100, done))
end
return table.concat(out)
