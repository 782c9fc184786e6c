-- retry: spend one attempt and schedule the job to run again (now, or after a delay), if its delivery is current.
--
-- KEYS[1] active   KEYS[2] tokens   KEYS[3] state   KEYS[4] wait   KEYS[5] delayed
-- KEYS[6] attempts KEYS[7] errors   KEYS[8] stats
-- ARGV[1] id   ARGV[2] token   ARGV[3] delay ms   ARGV[4] encoded error of this attempt
-- Returns: 1 = scheduled, 0 = stale delivery (rejected, counted in stats.stale_acks).
--!include _lib.lua

local now = now_ms()
local id = ARGV[1]
if not lease_ok(KEYS[1], KEYS[2], id, ARGV[2], now) then
  redis.call('HINCRBY', KEYS[8], 'stale_acks', 1)
  return 0
end
redis.call('ZREM', KEYS[1], id)
redis.call('HDEL', KEYS[2], id)
redis.call('HINCRBY', KEYS[6], id, 1)
redis.call('HSET', KEYS[7], id, ARGV[4])
local delay = tonumber(ARGV[3])
if delay > 0 then
  redis.call('ZADD', KEYS[5], now + delay, id)
  redis.call('HSET', KEYS[3], id, 'delayed')
else
  redis.call('LPUSH', KEYS[4], id)
  redis.call('HSET', KEYS[3], id, 'waiting')
end
redis.call('HINCRBY', KEYS[8], 'retried', 1)
return 1
