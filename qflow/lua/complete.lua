-- complete: record the results of a batch of jobs, each only if its delivery is still current.
--
-- KEYS[1] active   KEYS[2] tokens   KEYS[3] state    KEYS[4] results   KEYS[5] completed
-- KEYS[6] jobs     KEYS[7] attempts KEYS[8] stalls   KEYS[9] errors    KEYS[10] waiters   KEYS[11] stats
-- KEYS[12..] the notify list of each job, in ARGV order
-- ARGV[1] keep count   ARGV[2] keep age ms (-1: no age limit)   ARGV[3] notify ttl ms
-- ARGV[4..] groups of 3: id, token, encoded result
-- Returns: one string with a byte per job, '1' = completed, '0' = stale delivery (rejected, counted in
-- stats.stale_acks). One reply element per batch keeps the client's parsing off the hot path.
--!include _lib.lua

local now = now_ms()
local out = {}
local done, stale = 0, 0
for i = 4, #ARGV, 3 do
  local id, token = ARGV[i], ARGV[i + 1]
  if lease_ok(KEYS[1], KEYS[2], id, token, now) then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
    redis.call('HSET', KEYS[3], id, 'completed')
    redis.call('HSET', KEYS[4], id, ARGV[i + 2])
    redis.call('ZADD', KEYS[5], now, id)
    if redis.call('HDEL', KEYS[10], id) == 1 then
      local notify = KEYS[12 + (i - 4) / 3]
      redis.call('LPUSH', notify, 'completed')
      redis.call('PEXPIRE', notify, tonumber(ARGV[3]))
    end
    done = done + 1
    out[#out + 1] = '1'
  else
    stale = stale + 1
    out[#out + 1] = '0'
  end
end
if done > 0 then
  redis.call('HINCRBY', KEYS[11], 'completed', done)
  trim(KEYS[5], tonumber(ARGV[1]), tonumber(ARGV[2]), now,
       {KEYS[6], KEYS[3], KEYS[4], KEYS[9], KEYS[7], KEYS[8], KEYS[10]}, 100)
end
if stale > 0 then redis.call('HINCRBY', KEYS[11], 'stale_acks', stale) end
return table.concat(out)
