-- retry_failed: move failed jobs back to `wait` with a fresh set of attempts (an operator's `qflow jobs retry`).
-- The job keeps its id and envelope; its attempt and stall counters, its last error and any waiter entry left
-- by its failed life are cleared, so it runs as if newly added (it joins the back of the line).
--
-- KEYS[1] failed   KEYS[2] state   KEYS[3] wait   KEYS[4] jobs   KEYS[5] attempts   KEYS[6] stalls
-- KEYS[7] errors   KEYS[8] stats   KEYS[9] waiters   KEYS[10] marker
-- ARGV[1] mode: "ids" (ARGV[2..] are job ids) or "oldest" (ARGV[2] = most jobs to move, oldest failures first)
-- Returns: in "ids" mode, one integer per id: 1 = requeued, 0 = the job is not failed (left alone),
--          -1 = no such job (never added, or trimmed by retention);
--          in "oldest" mode: { jobs requeued, failed jobs left }.
-- Errors: "QFLOW_CORRUPT <what>" when a key holds the wrong type; nothing was written.
-- A notify list left by the failed life is not cleared here (the ids of "oldest" mode are found while the
-- script runs, so their notify keys cannot be passed in KEYS): watch.lua deletes it when a waiter registers.
-- Jobs requeued wake one idle fetcher (see _lib.lua).
--!include _lib.lua

if ARGV[1] ~= 'ids' and ARGV[1] ~= 'oldest' then
  return redis.error_reply('retry_failed: unknown mode ' .. tostring(ARGV[1]))
end
local err = bad_types({KEYS[1], 'zset', KEYS[2], 'hash', KEYS[3], 'list', KEYS[4], 'hash', KEYS[5], 'hash',
                       KEYS[6], 'hash', KEYS[7], 'hash', KEYS[8], 'hash', KEYS[9], 'hash', KEYS[10], 'zset'})
if err then return corrupt(err) end

-- Every key is of its type (checked above), so no call below can fail part-way.
local function requeue(id)
  local state = redis.call('HGET', KEYS[2], id)
  if not state or redis.call('HEXISTS', KEYS[4], id) == 0 then return -1 end
  if state ~= 'failed' then return 0 end
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[5], id)
  redis.call('HDEL', KEYS[6], id)
  redis.call('HDEL', KEYS[7], id)
  redis.call('HDEL', KEYS[9], id)
  redis.call('HSET', KEYS[2], id, 'waiting')
  redis.call('LPUSH', KEYS[3], id)
  return 1
end

local moved = 0
local out = {}
if ARGV[1] == 'ids' then
  for i = 2, #ARGV do
    local r = requeue(ARGV[i])
    if r == 1 then moved = moved + 1 end
    out[#out + 1] = r
  end
else
  local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
  for _, id in ipairs(ids) do
    if requeue(id) == 1 then
      moved = moved + 1
    else
      -- a failed-set member without a failed state or envelope is debris: drop it so the loop ends
      redis.call('ZREM', KEYS[1], id)
    end
  end
  out = {moved, redis.call('ZCARD', KEYS[1])}
end
if moved > 0 then
  wake_now(KEYS[10])
  bump(KEYS[8], {'requeued', moved})
end
return out
