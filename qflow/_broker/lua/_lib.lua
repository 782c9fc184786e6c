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

-- Validate and read first, write last (DESIGN.md, data-model rules): Redis keeps the writes a script made
-- before an error, so a pop or a move followed by a step that raises loses jobs. Every script checks, before
-- its first write, each key it will write (`bad_types`) and each stored number it will add to or pack
-- (`is_count`), then decides, then writes. When the whole call is impossible (a key of the wrong type, a
-- corrupt `seq`) it answers an error reply starting "QFLOW_CORRUPT " and naming the key, having written
-- nothing; data corrupt in one job fails that job alone, with kind "corrupt" (`corrupt_error`).

-- The error reply of a call that cannot go on: nothing was written.
local function corrupt(what)
  return redis.error_reply('QFLOW_CORRUPT ' .. what)
end

-- A stored value, printable in a message: at most 40 bytes, anything but printable ASCII as \xNN.
local function shown(value)
  local s = string.gsub(string.sub(tostring(value), 1, 40), '[^%w%p ]', function(c)
    return string.format('\\x%02x', string.byte(c))
  end)
  return "'" .. s .. "'"
end

-- What a redis.pcall answered; or nil and a message naming `key` when that key holds the wrong type. Any other
-- error (out of memory, an ACL refusal...) is raised as it came: it says nothing about the data.
local function checked(reply, key)
  if type(reply) == 'table' and reply.err then
    if string.sub(reply.err, 1, 9) == 'WRONGTYPE' then return nil, 'key ' .. key .. ': ' .. reply.err end
    error(reply)
  end
  return reply
end

-- The cheapest command that fails on a key of another type than its own (TYPE costs twice as much: its
-- status reply becomes a Lua table).
local LENGTH_OF = {hash = 'HLEN', zset = 'ZCARD', list = 'LLEN', string = 'STRLEN'}

-- nil when every key of `checks` ({key, type, key, type...}) is missing or of its type; else a message
-- naming the first that is not.
local function bad_types(checks)
  for i = 1, #checks, 2 do
    local _, wrong = checked(redis.pcall(LENGTH_OF[checks[i + 1]], checks[i]), checks[i])
    if wrong then
      return 'key ' .. checks[i] .. ' holds a ' .. redis.call('TYPE', checks[i])['ok'] .. ', not a ' ..
             checks[i + 1]
    end
  end
  return nil
end

-- Whether a stored counter (false: missing) is a whole number of at most `digits` digits: HINCRBY can add
-- to it and struct.pack can pack it ('I4' takes 9 digits; a token counter 15, exact in a Lua number).
local function is_count(value, digits)
  return not value or (#value <= digits and string.find(value, '^%d+$') ~= nil)
end

-- The encoded error (msgpack, as qflow._codec.ErrorInfo) of a job whose stored `field` holds `value`, which
-- should be a whole number from 0 to `most` (default 999999999: a counter).
local function corrupt_error(field, value, most)
  return cmsgpack.pack({
    type = 'CorruptJob',
    kind = 'corrupt',
    traceback = '',
    message = 'stored ' .. field .. ' of the job is ' .. shown(value) ..
              ', not a whole number from 0 to ' .. (most or '999999999') .. ': the job cannot run as stored',
  })
end

-- Add to counters of the `stats` hash ({field, n, field, n...}); a field that is not a whole number (written
-- by hand) or would overflow starts again from n instead of failing the call: counters are no job's data.
-- Writes; call it once `stats` is known to be a hash (a failed HINCRBY writes nothing). Other errors (out of
-- memory, when this is a script's first write) are raised as they came.
local function bump(stats, incs)
  for i = 1, #incs, 2 do
    local added = redis.pcall('HINCRBY', stats, incs[i], incs[i + 1])
    if type(added) == 'table' then
      if string.sub(added.err, 1, 4) ~= 'ERR ' then error(added) end
      redis.call('HSET', stats, incs[i], incs[i + 1])
    end
  end
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
-- where the field or member is missing. A key of the wrong type answers nil and an error message naming it.
local function read_batched(cmd, key, items)
  local n = #items
  if n == 0 then return {} end
  local out = {}
  for i = 1, n, BATCH_ARGS do
    local part, wrong = checked(redis.pcall(cmd, key, unpack(items, i, math.min(i + BATCH_ARGS - 1, n))), key)
    if wrong then return nil, wrong end
    if n <= BATCH_ARGS then return part end
    for j = 1, #part do out[#out + 1] = part[j] end
  end
  return out
end

-- Drop the oldest finished jobs from `zset` beyond `keep` entries or older than `age_ms`, and every per-job
-- field they own in `hashes`. At most `limit` jobs per call, so one ack never does unbounded work; a caller
-- that just added n jobs passes a limit of at least n, so the set never grows past `keep` under load (issue 12
-- item 7: at most 100 per call beside ack batches of 200 let the completed set grow without bound).
-- Call it after the type checks (`bad_types`) of `zset` and `hashes`: it writes.
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
  call_batched('ZREM', zset, victims)
  for _, h in ipairs(hashes) do call_batched('HDEL', h, victims) end
  return #victims
end

-- Wake-ups (issue 14). Idle fetchers block on the queue's `marker` sorted set with BZPOPMIN, which hands each
-- member to one of them: a wake-up wakes one fetcher, never all (BLMOVE on `wait` woke every idle fetcher on
-- every push). Member 'now' (score 0) says jobs wait; member 'due' (score: a due time, ms) says a delayed job
-- became the earliest and the fetcher that times its wait to the earliest (the holder, named in `timer`) must
-- be found again: whoever pops it claims, and the claim makes it the holder. A fetcher that pops either one
-- always claims, so a stale wake-up costs one empty claim, never a lost job. Call these after the type checks
-- (`bad_types` of `marker` as a zset): they write.

-- Jobs were pushed to `wait`: one idle fetcher wakes and claims. A no-op while the wake-up is still there.
local function wake_now(marker)
  redis.call('ZADD', marker, 0, 'now')
end

-- The score of the earliest delayed job (a number), or nil when none is delayed. A read: call it before the
-- writes that add to `delayed`, to tell whether a new due time is the earliest (`wake_due`).
local function earliest_due(delayed)
  local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
  if #first == 0 then return nil end
  return tonumber(first[2])
end

-- A job is due at `at`, before `earliest` (what `earliest_due` read before the writes; nil: nothing was
-- delayed): the holder times its wait to a later time, so its role ends (`timer` deleted) and one idle
-- fetcher wakes to claim, take the role and time its wait to `at`. Nothing is done for a later due time: the
-- holder finds it when it claims at the earlier one.
local function wake_due(marker, timer, earliest, at)
  if earliest and at >= earliest then return end
  redis.call('ZADD', marker, 'LT', at, 'due')
  redis.call('DEL', timer)
end

-- `redis.call(...)` of a write that only helps (a wake-up, the timer), where out of memory must not fail the
-- call: at maxmemory the first write of a script may be refused, and an empty claim writes nothing else.
-- Other errors are raised as they came; call it after the type checks.
local function tolerant(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply.err and string.sub(reply.err, 1, 4) ~= 'OOM ' then error(reply) end
  return reply
end
