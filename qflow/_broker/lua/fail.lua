-- fail: move one job to its terminal `failed` state, if its delivery is still current.
--
-- KEYS[1] active   KEYS[2] tokens   KEYS[3] state    KEYS[4] errors    KEYS[5] failed
-- KEYS[6] jobs     KEYS[7] attempts KEYS[8] stalls   KEYS[9] results   KEYS[10] waiters   KEYS[11] stats
-- KEYS[12] notify list of the job
-- ARGV[1] id   ARGV[2] token   ARGV[3] encoded error   ARGV[4] 1 = the run spent an attempt, 0 = it did not
-- ARGV[5] keep count   ARGV[6] keep age ms (-1: no age limit)   ARGV[7] notify ttl ms
-- Returns: 1 = failed (now, or already by this very delivery: see below), 0 = stale delivery (rejected,
-- counted in stats.stale_acks).
-- Errors: "QFLOW_CORRUPT <what>" when a key holds the wrong type; nothing was written.
-- Sent again (its reply was lost after this script ran, and the worker resends the ack): `tokens` keeps the
-- token of the delivery that failed a job until retention trims the job, so an ack whose token is still
-- stored for a job already `failed` is this delivery's own recorded outcome: 1, nothing written or counted
-- (as in complete.lua).
-- An attempts field that is not a count is left as it is (the job fails all the same, with its own error).
--!include _lib.lua

local now = now_ms()
local id = ARGV[1]
local err = bad_types({KEYS[1], 'zset', KEYS[2], 'hash', KEYS[3], 'hash', KEYS[4], 'hash', KEYS[5], 'zset',
                       KEYS[6], 'hash', KEYS[7], 'hash', KEYS[8], 'hash', KEYS[9], 'hash', KEYS[10], 'hash',
                       KEYS[11], 'hash'})
if err then return corrupt(err) end
-- lease_ok, with the stored token kept for the check below.
local holder = redis.call('HGET', KEYS[2], id)
local deadline = holder == ARGV[2] and redis.call('ZSCORE', KEYS[1], id)
if not deadline or tonumber(deadline) <= now then
  -- Not current. Recorded already if this ack's token is stored for a `failed` job (the ack is sent again);
  -- else stale (another delivery's token, or an expired lease not recovered yet).
  if holder == ARGV[2] and redis.call('HGET', KEYS[3], id) == 'failed' then return 1 end
  bump(KEYS[11], {'stale_acks', 1})
  return 0
end
local spent = ARGV[4] == '1' and is_count(redis.call('HGET', KEYS[7], id), 15)
local awaited = redis.call('HEXISTS', KEYS[10], id) == 1

-- Write.
redis.call('ZREM', KEYS[1], id)
-- `tokens` keeps the job's token (the one checked above) until the job is trimmed: see the header.
redis.call('HSET', KEYS[3], id, 'failed')
redis.call('HSET', KEYS[4], id, ARGV[3])
if spent then redis.call('HINCRBY', KEYS[7], id, 1) end
redis.call('ZADD', KEYS[5], now, id)
if awaited then
  redis.call('HDEL', KEYS[10], id)
  -- One element at most: whatever an earlier life of the id left there goes (a key of any type).
  redis.call('DEL', KEYS[12])
  redis.call('LPUSH', KEYS[12], 'failed')
  redis.call('PEXPIRE', KEYS[12], tonumber(ARGV[7]))
end
bump(KEYS[11], {'failed', 1})
trim(KEYS[5], tonumber(ARGV[5]), tonumber(ARGV[6]), now,
     {KEYS[6], KEYS[3], KEYS[4], KEYS[9], KEYS[7], KEYS[8], KEYS[10], KEYS[2]}, 100)
return 1
