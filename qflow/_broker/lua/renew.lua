-- renew: extend the leases a worker holds on one queue, in one call for all of them.
--
-- KEYS[1] active   KEYS[2] tokens
-- ARGV[1] lease ms   ARGV[2..] pairs: id, token
-- Returns: the ids whose lease was lost (expired, recovered, or taken by another delivery); the worker
-- cancels those handlers, since their acks would be rejected anyway.
-- Errors: "QFLOW_CORRUPT <what>" when a key holds the wrong type; nothing was written.
--!include _lib.lua

local err = bad_types({KEYS[1], 'zset', KEYS[2], 'hash'})
if err then return corrupt(err) end
-- A first write that is not deny-oom (HDEL of a field that never exists): at maxmemory, Redis refuses a
-- script whose first write is deny-oom, and lets it run once it has written. Renewals must go on at
-- maxmemory, or running jobs lose their leases (tests/faults: test_worker_rides_out_maxmemory...).
redis.call('HDEL', KEYS[2], '')
local now = now_ms()
local deadline = now + tonumber(ARGV[1])
local lost = {}
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  if lease_ok(KEYS[1], KEYS[2], id, ARGV[i + 1], now) then
    redis.call('ZADD', KEYS[1], 'XX', deadline, id)
  else
    lost[#lost + 1] = id
  end
end
return lost
