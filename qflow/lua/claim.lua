-- claim: promote due delayed jobs, then move up to `count` waiting jobs into `active`, each under a new lease.
--
-- KEYS[1] wait    KEYS[2] active    KEYS[3] delayed    KEYS[4] jobs    KEYS[5] state
-- KEYS[6] tokens  KEYS[7] attempts  KEYS[8] stalls     KEYS[9] seq
-- KEYS[10] failed KEYS[11] errors   KEYS[12] stats   (10-12 only needed with ARGV[4])
-- ARGV[1] count    ARGV[2] lease_ms    ARGV[3] promote limit
-- ARGV[4] largest envelope a worker accepts, bytes (optional)   ARGV[5] encoded error for a larger one
-- A job whose envelope is larger fails here (kind "payload") instead of travelling: one huge reply would
-- outlast the leases of every job claimed with it (tests/faults: a 50 MB job took its batch down).
-- Returns: { ms until the next delayed job is due (-1: none), waiting jobs left, packed jobs }
--   packed jobs: one string, per job a 20-byte head struct '>I4I4I4I4I4' (id length, token length, envelope
--   length, attempts spent, stalls) then the id, token and envelope bytes. One reply element for the whole
--   batch instead of five per job: the client's reply parser was a third of a worker's CPU (issue #6).
-- A job id whose envelope is gone (deleted by hand) is dropped from `wait` and not returned.
--!include _lib.lua

local now = now_ms()

local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
if #due > 0 then
  redis.call('ZREM', KEYS[3], unpack(due))
  for _, id in ipairs(due) do
    redis.call('LPUSH', KEYS[1], id)
    redis.call('HSET', KEYS[5], id, 'waiting')
  end
end

local out = {-1, 0, ''}
local packed = {}
local ids = redis.call('RPOP', KEYS[1], tonumber(ARGV[1]))
if ids then
  local last = redis.call('INCRBY', KEYS[9], #ids)
  local deadline = now + tonumber(ARGV[2])
  local largest = tonumber(ARGV[4])
  for i, id in ipairs(ids) do
    local env = false
    if largest and redis.call('HSTRLEN', KEYS[4], id) > largest then
      redis.call('HSET', KEYS[5], id, 'failed')
      redis.call('HSET', KEYS[11], id, ARGV[5])
      redis.call('ZADD', KEYS[10], now, id)
      redis.call('HINCRBY', KEYS[12], 'failed', 1)
    else
      env = redis.call('HGET', KEYS[4], id)
      if not env then redis.call('HDEL', KEYS[5], id) end
    end
    if env then
      local token = tostring(last - #ids + i)
      redis.call('ZADD', KEYS[2], deadline, id)
      redis.call('HSET', KEYS[6], id, token)
      redis.call('HSET', KEYS[5], id, 'active')
      local attempts = tonumber(redis.call('HGET', KEYS[7], id) or '0')
      local stalls = tonumber(redis.call('HGET', KEYS[8], id) or '0')
      packed[#packed + 1] = struct.pack('>I4I4I4I4I4', #id, #token, #env, attempts, stalls) .. id .. token .. env
    end
  end
end

local nxt = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
if #nxt > 0 then out[1] = math.max(0, tonumber(nxt[2]) - now) end
out[2] = redis.call('LLEN', KEYS[1])
out[3] = table.concat(packed)
return out
