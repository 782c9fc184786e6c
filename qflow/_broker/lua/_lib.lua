-- Shared helpers, pasted at the top of every script by qflow._broker.evalsha (the `--!include _lib.lua` line).

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

-- Variadic forms (HMGET, HSET f v f v, ZADD s m s m, ZREM, HDEL, LPUSH...) take a whole batch in one call: the
-- fixed cost of a redis.call (command lookup, argument objects, key lookup) is paid once per batch instead of
-- once per job (issue #6). Lua's unpack is bounded by its C stack (LUAI_MAXCSTACK = 8000), so a long list goes
-- out in chunks of BATCH_ARGS items; the number is even, so field/value and score/member pairs stay whole.
local BATCH_ARGS = 1000

-- `cmd key items...` in as few calls as possible; nothing is sent for an empty list.
local function call_batched(cmd, key, items)
  local n = #items
  for i = 1, n, BATCH_ARGS do
    redis.call(cmd, key, unpack(items, i, math.min(i + BATCH_ARGS - 1, n)))
  end
end

-- The replies of a reading variadic command (HMGET, ZMSCORE) over `items`, one per item, in order; false
-- where the field or member is missing.
local function read_batched(cmd, key, items)
  local n = #items
  if n == 0 then return {} end
  if n <= BATCH_ARGS then return redis.call(cmd, key, unpack(items)) end
  local out = {}
  for i = 1, n, BATCH_ARGS do
    local part = redis.call(cmd, key, unpack(items, i, math.min(i + BATCH_ARGS - 1, n)))
    for j = 1, #part do out[#out + 1] = part[j] end
  end
  return out
end
