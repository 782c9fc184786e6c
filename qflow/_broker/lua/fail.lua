-- fail: move one job to its terminal `failed` state, if its delivery is still current.
--
-- KEYS[1] active   KEYS[2] tokens   KEYS[3] state    KEYS[4] errors    KEYS[5] failed
-- KEYS[6] jobs     KEYS[7] attempts KEYS[8] stalls   KEYS[9] results   KEYS[10] waiters   KEYS[11] stats
-- KEYS[12] notify list of the job
-- ARGV[1] id   ARGV[2] token   ARGV[3] encoded error   ARGV[4] 1 = the run spent an attempt, 0 = it did not
-- ARGV[5] keep count   ARGV[6] keep age ms (-1: no age limit)   ARGV[7] notify ttl ms
-- Returns: 1 = failed, 0 = stale delivery (rejected, counted in stats.stale_acks).
--!include _lib.lua

local now = now_ms()
local id = ARGV[1]
if not lease_ok(KEYS[1], KEYS[2], id, ARGV[2], now) then
  redis.call('HINCRBY', KEYS[11], 'stale_acks', 1)
  return 0
end
redis.call('ZREM', KEYS[1], id)
redis.call('HDEL', KEYS[2], id)
redis.call('HSET', KEYS[3], id, 'failed')
redis.call('HSET', KEYS[4], id, ARGV[3])
if ARGV[4] == '1' then redis.call('HINCRBY', KEYS[7], id, 1) end
redis.call('ZADD', KEYS[5], now, id)
if redis.call('HDEL', KEYS[10], id) == 1 then
  redis.call('LPUSH', KEYS[12], 'failed')
  redis.call('PEXPIRE', KEYS[12], tonumber(ARGV[7]))
end
redis.call('HINCRBY', KEYS[11], 'failed', 1)
trim(KEYS[5], tonumber(ARGV[5]), tonumber(ARGV[6]), now,
     {KEYS[6], KEYS[3], KEYS[4], KEYS[9], KEYS[7], KEYS[8], KEYS[10]}, 100)
return 1
