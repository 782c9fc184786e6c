-- retry: spend one attempt and schedule the job to run again (now, or after a delay), if its delivery is current.
--
-- KEYS[1] active   KEYS[2] tokens   KEYS[3] state   KEYS[4] wait   KEYS[5] delayed
-- KEYS[6] attempts KEYS[7] errors   KEYS[8] stats    KEYS[9] marker   KEYS[10] timer
-- ARGV[1] id   ARGV[2] token   ARGV[3] delay ms   ARGV[4] encoded error of this attempt
-- Returns: 1 = scheduled, 0 = stale delivery (rejected, counted in stats.stale_acks).
-- Errors: "QFLOW_CORRUPT <what>" when a key holds the wrong type; nothing was written.
-- An attempts field that is not a count is left as it is: the next claim fails the job with kind "corrupt".
-- Wake-ups (see _lib.lua): a retry now wakes one idle fetcher; a retry due before every delayed job wakes one to
-- time its wait to it, so the backoff ends on time (issue 14).
--!include _lib.lua

local now = now_ms()
local id = ARGV[1]
local err = bad_types({KEYS[1], 'zset', KEYS[2], 'hash', KEYS[3], 'hash', KEYS[4], 'list', KEYS[5], 'zset',
                       KEYS[6], 'hash', KEYS[7], 'hash', KEYS[8], 'hash', KEYS[9], 'zset'})
if err then return corrupt(err) end
if not lease_ok(KEYS[1], KEYS[2], id, ARGV[2], now) then
  bump(KEYS[8], {'stale_acks', 1})
  return 0
end
local counted = is_count(redis.call('HGET', KEYS[6], id), 15)
local delay = tonumber(ARGV[3])
local earliest = nil
if delay > 0 then earliest = earliest_due(KEYS[5]) end

-- Write.
redis.call('ZREM', KEYS[1], id)
redis.call('HDEL', KEYS[2], id)
if counted then redis.call('HINCRBY', KEYS[6], id, 1) end
redis.call('HSET', KEYS[7], id, ARGV[4])
if delay > 0 then
  redis.call('ZADD', KEYS[5], now + delay, id)
  redis.call('HSET', KEYS[3], id, 'delayed')
  wake_due(KEYS[9], KEYS[10], earliest, now + delay)
else
  redis.call('LPUSH', KEYS[4], id)
  redis.call('HSET', KEYS[3], id, 'waiting')
  wake_now(KEYS[9])
end
bump(KEYS[8], {'retried', 1})
return 1
