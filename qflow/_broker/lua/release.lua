-- release: hand jobs back to the front of `wait` without spending an attempt (graceful stop, drain timeout).
--
-- KEYS[1] active   KEYS[2] tokens   KEYS[3] state   KEYS[4] wait   KEYS[5] stats   KEYS[6] marker
-- ARGV[1..] pairs: id, token
-- Returns: one integer per job, 1 = released, 0 = stale delivery (left alone, counted in stats.stale_acks).
-- Errors: "QFLOW_CORRUPT <what>" when a key holds the wrong type; nothing was written.
-- Jobs handed back wake one idle fetcher (see _lib.lua): another worker runs them at once.
--!include _lib.lua

local now = now_ms()
local err = bad_types({KEYS[1], 'zset', KEYS[2], 'hash', KEYS[3], 'hash', KEYS[4], 'list', KEYS[5], 'hash',
                       KEYS[6], 'zset'})
if err then return corrupt(err) end
local out = {}
local released, seen, stale = {}, {}, 0
for i = 1, #ARGV, 2 do
  local id = ARGV[i]
  -- A job released earlier in this batch is no longer active: stale, as when each release ran in turn.
  if not seen[id] and lease_ok(KEYS[1], KEYS[2], id, ARGV[i + 1], now) then
    released[#released + 1] = id
    seen[id] = true
    out[#out + 1] = 1
  else
    stale = stale + 1
    out[#out + 1] = 0
  end
end

-- Write.
local incs = {}
for _, id in ipairs(released) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  redis.call('RPUSH', KEYS[4], id)
  redis.call('HSET', KEYS[3], id, 'waiting')
end
if #released > 0 then
  wake_now(KEYS[6])
  incs[#incs + 1] = 'released'
  incs[#incs + 1] = #released
end
if stale > 0 then
  incs[#incs + 1] = 'stale_acks'
  incs[#incs + 1] = stale
end
bump(KEYS[5], incs)
return out
