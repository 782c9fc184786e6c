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
-- Each hash is read and written once per batch (HMGET, HSET f v f v..., ZADD s m s m...), not once per job:
-- a redis.call's fixed cost dominated the server CPU of a claim (issue #6).
--!include _lib.lua

local now = now_ms()

local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
if #due > 0 then
  redis.call('ZREM', KEYS[3], unpack(due))
  -- One LPUSH of all of them pushes them in the same order as one LPUSH each.
  call_batched('LPUSH', KEYS[1], due)
  local states = {}
  for _, id in ipairs(due) do
    states[#states + 1] = id
    states[#states + 1] = 'waiting'
  end
  call_batched('HSET', KEYS[5], states)
end

local out = {-1, 0, ''}
local packed = {}
local ids = redis.call('RPOP', KEYS[1], tonumber(ARGV[1]))
if ids then
  local last = redis.call('INCRBY', KEYS[9], #ids)
  local deadline = now + tonumber(ARGV[2])
  local largest = tonumber(ARGV[4])
  -- Nothing below writes these hashes, so one read per batch sees what a read per job would have seen.
  -- An oversize envelope is read into the script's memory here, but never put in the reply.
  local envs = read_batched('HMGET', KEYS[4], ids)
  local attempts = read_batched('HMGET', KEYS[7], ids)
  local stalls = read_batched('HMGET', KEYS[8], ids)
  local leased, tokens, states, gone, failed, errors = {}, {}, {}, {}, {}, {}
  for i, id in ipairs(ids) do
    local env = envs[i]
    -- The same tests in the same order as HSTRLEN (0 for a missing field) then HGET.
    if largest and (env and #env or 0) > largest then
      states[#states + 1] = id
      states[#states + 1] = 'failed'
      errors[#errors + 1] = id
      errors[#errors + 1] = ARGV[5]
      failed[#failed + 1] = now
      failed[#failed + 1] = id
    elseif not env then
      gone[#gone + 1] = id
    else
      -- An id twice in one batch is leased twice, as before: the later token wins in `tokens`.
      local token = tostring(last - #ids + i)
      leased[#leased + 1] = deadline
      leased[#leased + 1] = id
      tokens[#tokens + 1] = id
      tokens[#tokens + 1] = token
      states[#states + 1] = id
      states[#states + 1] = 'active'
      packed[#packed + 1] = struct.pack('>I4I4I4I4I4', #id, #token, #env, tonumber(attempts[i] or '0'),
                                        tonumber(stalls[i] or '0')) .. id .. token .. env
    end
  end
  call_batched('HDEL', KEYS[5], gone)
  call_batched('ZADD', KEYS[2], leased)
  call_batched('HSET', KEYS[6], tokens)
  call_batched('HSET', KEYS[5], states)
  if #errors > 0 then
    call_batched('HSET', KEYS[11], errors)
    call_batched('ZADD', KEYS[10], failed)
    redis.call('HINCRBY', KEYS[12], 'failed', #errors / 2)
  end
end

local nxt = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
if #nxt > 0 then out[1] = math.max(0, tonumber(nxt[2]) - now) end
out[2] = redis.call('LLEN', KEYS[1])
out[3] = table.concat(packed)
return out
