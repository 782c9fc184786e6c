-- renew: extend the leases a worker holds on one queue, in one call for all of them.
--
-- KEYS[1] active   KEYS[2] tokens
-- ARGV[1] lease ms   ARGV[2..] pairs: id, token
-- Returns: the ids whose lease was lost (expired, recovered, or taken by another delivery); the worker
-- cancels those handlers, since their acks would be rejected anyway.
--!include _lib.lua

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
