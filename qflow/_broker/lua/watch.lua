-- watch: read a job's state and outcome; if it is not finished yet, register a waiter so the finishing script
-- pushes to the job's notify list. Reading and registering in one step leaves no gap for a missed wake-up.
--
-- KEYS[1] state   KEYS[2] results   KEYS[3] errors   KEYS[4] waiters
-- KEYS[5] notify list of the job
-- ARGV[1] id
-- Returns: {state or false, encoded result or error or false}
-- Errors: "QFLOW_CORRUPT <what>" when the waiters key holds the wrong type; nothing was written.
-- A job that is not finished has nothing to say in its notify list: what is there was pushed when an earlier
-- life of the id finished (before retention trimmed it and the id was added again, or before an operator's
-- retry_failed), and would end every blocking wait at once. Registering a waiter deletes it, so a waiter
-- blocks until this life finishes instead of spinning (issue 12 item 8).
--!include _lib.lua

local id = ARGV[1]
local st = redis.call('HGET', KEYS[1], id)
if st == 'completed' then return {st, redis.call('HGET', KEYS[2], id)} end
if st == 'failed' then return {st, redis.call('HGET', KEYS[3], id)} end
if st == 'expired' then return {st, false} end  -- finished, never run: no result, no error
if st then
  local _, wrong = checked(redis.pcall('HSET', KEYS[4], id, 1), KEYS[4])
  if wrong then return corrupt(wrong) end
  redis.call('DEL', KEYS[5])
end
return {st, false}
