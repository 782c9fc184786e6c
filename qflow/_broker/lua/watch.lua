-- watch: read a job's state and outcome; if it is not finished yet, register a waiter so the finishing script
-- pushes to the job's notify list. Reading and registering in one step leaves no gap for a missed wake-up.
--
-- KEYS[1] state   KEYS[2] results   KEYS[3] errors   KEYS[4] waiters
-- ARGV[1] id
-- Returns: {state or false, encoded result or error or false}
-- Errors: "QFLOW_CORRUPT <what>" when the waiters key holds the wrong type; nothing was written.
--!include _lib.lua

local id = ARGV[1]
local st = redis.call('HGET', KEYS[1], id)
if st == 'completed' then return {st, redis.call('HGET', KEYS[2], id)} end
if st == 'failed' then return {st, redis.call('HGET', KEYS[3], id)} end
if st then
  local registered = redis.pcall('HSET', KEYS[4], id, 1)
  if type(registered) == 'table' then return corrupt('key ' .. KEYS[4] .. ': ' .. registered.err) end
end
return {st, false}
