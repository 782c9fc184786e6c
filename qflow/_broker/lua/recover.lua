-- recover: give jobs whose lease expired (their worker died or went silent) back to `wait`, or fail them with
-- reason "stalled" once they have stalled more than `max_stalls` times. One checker acts per interval across
-- all workers: the first to take the `checker` lock.
--
-- KEYS[1] active   KEYS[2] tokens   KEYS[3] state    KEYS[4] wait     KEYS[5] failed   KEYS[6] errors
-- KEYS[7] stalls   KEYS[8] checker  KEYS[9] stats    KEYS[10] jobs    KEYS[11] results KEYS[12] attempts
-- KEYS[13] waiters
-- ARGV[1] checker id   ARGV[2] lock ms   ARGV[3] max stalls   ARGV[4] encoded "stalled" error
-- ARGV[5] keep failed count   ARGV[6] keep failed age ms (-1: no age limit)   ARGV[7] limit per call
-- Returns: {-1} if another checker holds the interval, else {recovered, failed, ids...}.
--!include _lib.lua

-- First write not deny-oom, so recovery still runs at maxmemory (see renew.lua).
redis.call('HDEL', KEYS[2], '')
if not redis.call('SET', KEYS[8], ARGV[1], 'NX', 'PX', tonumber(ARGV[2])) then return {-1} end
local now = now_ms()
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[7]))
local max_stalls = tonumber(ARGV[3])
local out = {0, 0}
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  local stalls = redis.call('HINCRBY', KEYS[7], id, 1)
  if stalls > max_stalls then
    redis.call('HSET', KEYS[3], id, 'failed')
    redis.call('HSET', KEYS[6], id, ARGV[4])
    redis.call('ZADD', KEYS[5], now, id)
    out[2] = out[2] + 1
  else
    redis.call('RPUSH', KEYS[4], id)
    redis.call('HSET', KEYS[3], id, 'waiting')
    out[1] = out[1] + 1
  end
  out[#out + 1] = id
end
if out[1] > 0 then redis.call('HINCRBY', KEYS[9], 'stalled', out[1]) end
if out[2] > 0 then
  redis.call('HINCRBY', KEYS[9], 'failed', out[2])
  redis.call('HINCRBY', KEYS[9], 'stalled', out[2])
  trim(KEYS[5], tonumber(ARGV[5]), tonumber(ARGV[6]), now,
       {KEYS[10], KEYS[3], KEYS[6], KEYS[11], KEYS[12], KEYS[7], KEYS[13]}, 100)
end
return out
