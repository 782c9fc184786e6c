-- add: create jobs, unless a job with the same id already exists (idempotent `job_id=`).
--
-- KEYS[1] jobs    KEYS[2] state    KEYS[3] wait    KEYS[4] delayed    KEYS[5] meta
-- ARGV[1] schema version
-- ARGV[2..] groups of 4: id, envelope, delay_ms (relative, 0 = none), run_at_ms (absolute, 0 = none)
-- Returns: one integer per job, 1 = created, 0 = an existing job kept that id.
-- Errors: "QFLOW_SCHEMA <stored>" when the queue was written by an incompatible schema.
--!include _lib.lua

local stored = redis.call('HGET', KEYS[5], 'schema')
if not stored then
  redis.call('HSET', KEYS[5], 'schema', ARGV[1])
elseif stored ~= ARGV[1] then
  return redis.error_reply('QFLOW_SCHEMA ' .. stored)
end

local now = now_ms()
local out = {}
for i = 2, #ARGV, 4 do
  local id = ARGV[i]
  if redis.call('HSETNX', KEYS[1], id, ARGV[i + 1]) == 1 then
    local at = tonumber(ARGV[i + 3])
    local delay = tonumber(ARGV[i + 2])
    if delay > 0 then at = now + delay end
    if at > now then
      redis.call('ZADD', KEYS[4], at, id)
      redis.call('HSET', KEYS[2], id, 'delayed')
    else
      redis.call('LPUSH', KEYS[3], id)
      redis.call('HSET', KEYS[2], id, 'waiting')
    end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
