-- schedule_upsert: create or change a schedule by id; the same spec and envelope again change nothing.
--
-- KEYS[1] schedules   KEYS[2] schedule_next   KEYS[3] schedule_state   KEYS[4] meta
-- ARGV[1] schema version   ARGV[2] schedule id   ARGV[3] encoded spec   ARGV[4] envelope of each tick's job
-- ARGV[5] first tick (ms): where the cursor starts when the schedule is new or changed
-- Returns: {changed (1/0), version, cursor or false}. A change takes a new version, unique in the queue
-- forever (a counter, `seq`, not reset by schedule_remove), so a process still computing with the old spec
-- cannot fire the new one; its cursor restarts at the first tick; fired/missed counts are kept.
-- Errors: "QFLOW_SCHEMA <stored>" for another schema; "QFLOW_CORRUPT <what>" for a key of the wrong type or a
-- corrupt counter. Nothing was written in either case.
--!include _lib.lua

local id = ARGV[2]
local stored, wrong = checked(redis.pcall('HGET', KEYS[4], 'schema'), KEYS[4])
if wrong then return corrupt(wrong) end
if stored and stored ~= ARGV[1] then
  return redis.error_reply('QFLOW_SCHEMA ' .. stored)
end
local err = bad_types({KEYS[1], 'hash', KEYS[2], 'zset', KEYS[3], 'hash'})
if err then return corrupt(err) end

local spec = redis.call('HGET', KEYS[1], id)
local state = redis.call('HMGET', KEYS[3], 'ver:' .. id, 'env:' .. id, 'seq')
if spec == ARGV[3] and state[2] == ARGV[4] and state[1] then
  return {0, tonumber(state[1]), redis.call('ZSCORE', KEYS[2], id)}
end
if not is_count(state[3], 15) then
  return corrupt('key ' .. KEYS[3] .. ': field seq is ' .. shown(state[3]))
end

-- Write.
local version = redis.call('HINCRBY', KEYS[3], 'seq', 1)
redis.call('HSET', KEYS[1], id, ARGV[3])
redis.call('HSET', KEYS[3], 'ver:' .. id, version, 'env:' .. id, ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[5], id)
if not stored then redis.call('HSET', KEYS[4], 'schema', ARGV[1]) end
return {1, version, ARGV[5]}
