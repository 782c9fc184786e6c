-- release: hand jobs back to the front of `wait` without spending an attempt (graceful stop, drain timeout).
--
-- KEYS[1] active   KEYS[2] tokens   KEYS[3] state   KEYS[4] wait   KEYS[5] stats
-- ARGV[1..] pairs: id, token
-- Returns: one integer per job, 1 = released, 0 = stale delivery (left alone, counted in stats.stale_acks).
--!include _lib.lua

local now = now_ms()
local out = {}
local released, stale = 0, 0
for i = 1, #ARGV, 2 do
  local id = ARGV[i]
  if lease_ok(KEYS[1], KEYS[2], id, ARGV[i + 1], now) then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
    redis.call('RPUSH', KEYS[4], id)
    redis.call('HSET', KEYS[3], id, 'waiting')
    released = released + 1
    out[#out + 1] = 1
  else
    stale = stale + 1
    out[#out + 1] = 0
  end
end
if released > 0 then redis.call('HINCRBY', KEYS[5], 'released', released) end
if stale > 0 then redis.call('HINCRBY', KEYS[5], 'stale_acks', stale) end
return out
