-- schedule_remove: delete a schedule (its spec, cursor and state); jobs it created are left alone.
--
-- KEYS[1] schedules   KEYS[2] schedule_next   KEYS[3] schedule_state
-- ARGV[1] schedule id
-- Returns: 1 if the schedule existed, else 0.
-- Errors: "QFLOW_CORRUPT <what>" when a key holds the wrong type; nothing was written.
--!include _lib.lua

local id = ARGV[1]
local err = bad_types({KEYS[1], 'hash', KEYS[2], 'zset', KEYS[3], 'hash'})
if err then return corrupt(err) end
local existed = redis.call('HDEL', KEYS[1], id)
redis.call('ZREM', KEYS[2], id)
redis.call('HDEL', KEYS[3], 'ver:' .. id, 'env:' .. id, 'last:' .. id, 'fired:' .. id, 'missed:' .. id)
return existed
