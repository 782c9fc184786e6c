-- Shared helpers, pasted at the top of every script by qflow._scripts (the `--!include _lib.lua` line).

-- Milliseconds on the Redis server's clock: every timestamp qflow stores comes from here, never from a client.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A delivery is current when the id is active, its lease has not expired, and the token matches.
local function lease_ok(active, tokens, id, token, now)
  local deadline = redis.call('ZSCORE', active, id)
  if not deadline or tonumber(deadline) <= now then return false end
  return redis.call('HGET', tokens, id) == token
end

-- Drop the oldest finished jobs from `zset` beyond `keep` entries or older than `age_ms`, and every per-job
-- field they own in `hashes`. At most `limit` jobs per call, so one ack never does unbounded work.
local function trim(zset, keep, age_ms, now, hashes, limit)
  local victims = {}
  local excess = redis.call('ZCARD', zset) - keep
  if excess > 0 then
    victims = redis.call('ZRANGE', zset, 0, math.min(excess, limit) - 1)
  end
  if #victims < limit and age_ms >= 0 then
    local old = redis.call('ZRANGEBYSCORE', zset, '-inf', now - age_ms, 'LIMIT', #victims, limit - #victims)
    for _, id in ipairs(old) do victims[#victims + 1] = id end
  end
  if #victims == 0 then return 0 end
  redis.call('ZREM', zset, unpack(victims))
  for _, h in ipairs(hashes) do redis.call('HDEL', h, unpack(victims)) end
  return #victims
end
