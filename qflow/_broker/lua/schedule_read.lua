-- schedule_read: every schedule of a queue, read at one instant (the worker's scheduler, `qflow schedules`).
--
-- KEYS[1] schedules   KEYS[2] schedule_next   KEYS[3] schedule_state
-- ARGV[1] 1 to include each schedule's job envelope, 0 to leave it out (the scheduler does not need it)
-- Returns: {now (ms), then per schedule 8 items: id, spec, version, cursor, last tick, fired, missed, envelope}
-- (false where a value is missing; envelope false unless asked for). Reads only.
-- Errors: "QFLOW_CORRUPT <what>" when a key holds the wrong type.
--!include _lib.lua

local specs, wrong = checked(redis.pcall('HGETALL', KEYS[1]), KEYS[1])
if wrong then return corrupt(wrong) end
local ids = {}
for i = 1, #specs, 2 do ids[#ids + 1] = specs[i] end
local cursors, bad = read_batched('ZMSCORE', KEYS[2], ids)
if bad then return corrupt(bad) end
local fields = {}
local with_env = ARGV[1] == '1'
for _, id in ipairs(ids) do
  fields[#fields + 1] = 'ver:' .. id
  fields[#fields + 1] = 'last:' .. id
  fields[#fields + 1] = 'fired:' .. id
  fields[#fields + 1] = 'missed:' .. id
  if with_env then fields[#fields + 1] = 'env:' .. id end
end
local values, worse = read_batched('HMGET', KEYS[3], fields)
if worse then return corrupt(worse) end
local per = with_env and 5 or 4
local out = {now_ms()}
for i, id in ipairs(ids) do
  local at = (i - 1) * per
  out[#out + 1] = id
  out[#out + 1] = specs[2 * i]
  out[#out + 1] = values[at + 1]
  out[#out + 1] = cursors[i]
  out[#out + 1] = values[at + 2]
  out[#out + 1] = values[at + 3]
  out[#out + 1] = values[at + 4]
  out[#out + 1] = with_env and values[at + 5] or false
end
return out
