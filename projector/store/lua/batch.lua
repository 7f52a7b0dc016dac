#!lua
-- One batch of one projection, all or nothing (see projector/store/redis.py).
-- ARGV[1]: "commit" (check, then write) or "check" (only check: a dry run of the writes).
-- ARGV[2]: JSON {fence = {{epochs, offsets, field, epoch, offset, starts, start, paused}...},
--                ops = {{COMMAND, key, arg...}...}, own = number of projector's own ops first,
--                versions = {{stream hash, version token read ("" for none)}...},
--                pointer = {version pointer, version planned at}: a batch's, checked like versions}
-- versions: the stream hashes the batch read, not WATCHed; each write of one sets its field
-- "v" to a new token, so one that holds another token now was written since the batch read
-- it: the same optimistic check as WATCH, answered "conflict" before anything is written.
-- A fence entry with an empty offset holds the partition without moving its checkpoint (a
-- correlation's idle tick). Besides Redis commands, ops may be projector's own DLADD (a
-- dead letter), COSET (SET of a correlation record: a string, checked like the rest) and
-- COTIME (a partition's correlation input progress, whose high never goes back), and the
-- outbox's (projector/store/redis_outbox.py): OUTBOX {ids zset, queue stream, seq string, id,
-- topic, key, event} queues a business event unless its id is in ids; OUTHOLD {hold hash,
-- ts zset, seq string, id, ts, message} holds a rebuild's aside unless held already; OUTPRUNE
-- {hold hash, ts zset, before} forgets held ones older than before (event time, ms).
-- GAPCOPY {schedules hash, due zset, held set, gap, score, held "1"|"0", parent} indexes a
-- gap that a batch carved out of an older one (parent): with the parent's schedule as it
-- stands now (the gap timer may have moved it since the batch read it), else with score
-- and held as given.
-- Returns {"ok"}, {"fenced", field...}, {"paused"} (a rebuild is swapping in: wait),
-- {"conflict", key} (a stream hash changed since it was read: plan again), or
-- {"badwrite", op index (1-based), reason}.
-- Redis does not roll a script back when a command fails half-way, so everything that could
-- fail is checked first: the fence, then each op against the type (and, for counters, the
-- value) its key will have by then, simulated in op order. Only then is anything written.
local mode = ARGV[1]
local batch = cjson.decode(ARGV[2])

-- What the checks know of keys, simulated in op order: types[key] (as TYPE answers), cleared
-- [key] (deleted by an op), and the value an op leaves in a string key (strings[key]) or a
-- hash field (fields[key][field]): either as written (a string, classified by class_of only
-- if an increment meets it: most never are) or {class, number}.
local types, cleared, strings, fields = {}, {}, {}, {}

if mode == "commit" then
  for _, f in ipairs(batch.fence) do
    if f[8] ~= "" and redis.call("EXISTS", f[8]) == 1 then return {"paused"} end
  end
  -- pointer: {version pointer, the version the batch was planned at ("" for none)}
  local pointer = batch.pointer
  if pointer and (redis.call("GET", pointer[1]) or "") ~= pointer[2] then
    return {"conflict", pointer[1]}
  end
  local lost = {}
  for _, f in ipairs(batch.fence) do
    if redis.call("HGET", f[1], f[3]) ~= f[4] then lost[#lost + 1] = f[3] end
  end
  if #lost > 0 then return {"fenced", unpack(lost)} end
  for _, v in ipairs(batch.versions or {}) do
    -- pcall: a key that is no hash now has changed too (the fresh read reports it)
    local now = redis.pcall("HGET", v[1], "v")
    if now == false then now = "" end
    if now ~= v[2] then return {"conflict", v[1]} end
    -- it holds the token read: a hash (one TYPE call less per stream; none holds no token)
    if now ~= "" then types[v[1]] = "hash" end
  end
end

local KIND = {
  SET = "string", INCRBY = "string", INCRBYFLOAT = "string",
  HSET = "hash", HDEL = "hash", HINCRBY = "hash", HINCRBYFLOAT = "hash",
  SADD = "set", SREM = "set",
  ZADD = "zset", ZREM = "zset", ZINCRBY = "zset",
  DLADD = "hash", COSET = "string", COTIME = "hash",
  OUTBOX = "zset", OUTHOLD = "hash", OUTPRUNE = "hash", GAPCOPY = "hash",
}
-- The other keys of the outbox commands: {op index, type}, in order.
local MORE = {
  OUTBOX = {{3, "stream"}, {4, "string"}}, OUTHOLD = {{3, "zset"}, {4, "string"}},
  OUTPRUNE = {{3, "zset"}},
}
local LIMIT = 9.2e18 -- INCRBY past a signed 64-bit integer fails; stay clear of it
local MAX_PARTS = 7000 -- unpack() fails past about 8,000 values: the caller splits commands
local REMOVE = {HDEL = true, SREM = true, ZREM = true}
local NONE = {"none", 0}


local function type_of(key)
  local t = types[key]
  if t == nil then
    t = redis.call("TYPE", key)["ok"]
    types[key] = t
  end
  return t
end

-- What a stored string is to INCRBY / INCRBYFLOAT: "int", "float", "none" or "other".
-- Stricter than Lua's tonumber where Redis is: no NUL (tonumber stops there), no hex, no
-- spaces, no nan/inf, at most 5,000 characters, and no underflow to 0 ("1e-5000").
local function class_of(raw)
  if not raw then return "none", 0 end
  if (raw == "0" or string.match(raw, "^%-?[1-9]%d*$")) and #raw <= 19 then
    return "int", tonumber(raw)
  end
  if #raw > 5000 or string.find(raw, "[%z%sxXnN]") then return "other", 0 end
  local n = tonumber(raw)
  if not n or n ~= n or n == math.huge or n == -math.huge then return "other", 0 end
  if n == 0 and string.find(string.match(raw, "^[^eE]*"), "[1-9]") then return "other", 0 end
  return "float", n
end

-- Where the value at key (a string key) or at its field lives in the simulation: the table
-- and its index.
local function slot_of(key, field)
  if not field then return strings, key end
  local t = fields[key]
  if not t then
    t = {}
    fields[key] = t
  end
  return t, field
end

local function number_at(key, field)
  local t, i = slot_of(key, field)
  local known = t[i]
  if known then
    if type(known) == "table" then return t, i, known[1], known[2] end
    local cls, value = class_of(known) -- as an op of this batch wrote it
    return t, i, cls, value
  end
  local raw = false
  if not cleared[key] then
    if field then
      if type_of(key) == "hash" then raw = redis.call("HGET", key, field) end
    elseif type_of(key) == "string" then
      raw = redis.call("GET", key)
    end
  end
  local cls, value = class_of(raw)
  return t, i, cls, value
end

local function where(key, field)
  return field and ("field " .. field .. " of " .. key) or key
end

local function add(key, field, amount_raw, integer)
  local t, i, cls, value = number_at(key, field)
  local amount = tonumber(amount_raw)
  if integer and cls ~= "none" and cls ~= "int" then
    return where(key, field) .. " does not hold an integer"
  end
  if not integer and cls == "other" then return where(key, field) .. " does not hold a number" end
  local result = value + amount
  if integer and (result > LIMIT or result < -LIMIT) then
    return "incrementing " .. where(key, field) .. " would overflow a 64-bit integer"
  end
  if result ~= result or result == math.huge or result == -math.huge then
    return "incrementing " .. where(key, field) .. " would not give a finite number"
  end
  -- Redis prints a float increment's result without trailing zeros: a whole one reads back
  -- as an integer.
  local whole = result == math.floor(result) and result < 1e17 and result > -1e17
  t[i] = {(integer or whole) and "int" or "float", result}
  return nil
end

-- The queue's next entry id must pass the stream's last one: its counter (a string) must
-- not be behind it, or XADD would fail half-way.
local streams_checked = {}
local function stream_behind(queue, seq)
  if streams_checked[queue] then return nil end
  streams_checked[queue] = true
  if redis.call("TYPE", queue)["ok"] ~= "stream" then return nil end
  local info = redis.call("XINFO", "STREAM", queue)
  for i = 1, #info, 2 do
    if info[i] == "last-generated-id" then
      local last = tonumber(string.match(info[i + 1], "^(%d+)-"))
      local _, _, cls, value = number_at(seq, nil)
      if cls ~= "int" and cls ~= "none" then return nil end -- reported by the add() below
      if last and last > value then
        return seq .. " is behind the stream " .. queue .. " (" .. info[i + 1] .. ")"
      end
    end
  end
  return nil
end

local function check_outbox(op)
  local cmd = op[1]
  for _, more in ipairs(MORE[cmd]) do
    local key, want = op[more[1]], more[2]
    local have = type_of(key)
    if have ~= "none" and have ~= want then
      return "WRONGTYPE: " .. cmd .. " needs a " .. want .. " at " .. key .. " but it is a " .. have
    end
  end
  if cmd == "OUTPRUNE" then
    if not tonumber(op[4]) then return "OUTPRUNE needs a time, not " .. tostring(op[4]) end
    return nil
  end
  if cmd == "OUTHOLD" and not string.match(tostring(op[6]), "^%-?%d+$") then
    return "OUTHOLD needs an event time, not " .. tostring(op[6])
  end
  if cmd == "OUTBOX" then
    local behind = stream_behind(op[3], op[4])
    if behind then return behind end
  end
  types[op[2]], types[op[3]], types[op[4]] = KIND[cmd], MORE[cmd][1][2], "string"
  return add(op[4], nil, "1", true) -- the counter, as if the event were new
end

local function check_gapcopy(op)
  for i, want in pairs({[3] = "zset", [4] = "set"}) do
    local have = type_of(op[i])
    if have ~= "none" and have ~= want then
      return "WRONGTYPE: GAPCOPY needs a " .. want .. " at " .. op[i] .. " but it is a " .. have
    end
    types[op[i]] = want
  end
  if op[6] ~= "+inf" and not tonumber(op[6]) then return "GAPCOPY needs a score, not " .. op[6] end
  return nil
end

local function check(op)
  local cmd, key = op[1], op[2]
  if #op > MAX_PARTS then return cmd .. " on " .. tostring(key) .. " has too many arguments" end
  if cmd == "DEL" then
    types[key], cleared[key], strings[key], fields[key] = "none", true, nil, nil
    return nil
  end
  local want = KIND[cmd]
  if want == nil then return "unknown command " .. tostring(cmd) end
  local have = type_of(key)
  if cmd == "SET" then
    types[key] = "string"
    strings[key] = op[3]
    return nil
  end
  if have ~= "none" and have ~= want then
    return "WRONGTYPE: " .. cmd .. " needs a " .. want .. " but " .. key .. " is a " .. have
  end
  if REMOVE[cmd] and have == "none" then return nil end -- removing from nothing leaves nothing
  types[key] = want
  if MORE[cmd] then return check_outbox(op) end
  if cmd == "GAPCOPY" then return check_gapcopy(op) end
  if cmd == "COTIME" and not string.match(tostring(op[4]), "^%-?%d*,[01]$") then
    return "COTIME on " .. key .. " needs <high>,<0|1>, not " .. tostring(op[4])
  end
  if cmd == "INCRBY" then return add(key, nil, op[3], true) end
  if cmd == "INCRBYFLOAT" then return add(key, nil, op[3], false) end
  if cmd == "HINCRBY" then return add(key, op[3], op[4], true) end
  if cmd == "HINCRBYFLOAT" then return add(key, op[3], op[4], false) end
  if cmd == "HSET" then
    local t = slot_of(key, true)
    for i = 3, #op - 1, 2 do t[op[i]] = op[i + 1] end
  elseif cmd == "HDEL" then
    local t = slot_of(key, true)
    for i = 3, #op do t[op[i]] = NONE end
  end
  return nil
end

for i, op in ipairs(batch.ops) do
  local problem = check(op)
  if problem then return {"badwrite", i, problem} end
end
if mode ~= "commit" then return {"ok"} end

for _, f in ipairs(batch.fence) do
  local current = redis.call("HGET", f[2], f[3])
  -- The first batch ever of a partition records where its history starts.
  if not current and f[7] ~= "" then redis.call("HSETNX", f[6], f[3], f[7]) end
  if f[5] ~= "" and tonumber(f[5]) > tonumber(current or "-1") then
    redis.call("HSET", f[2], f[3], f[5])
  end
end

-- {COTIME, times hash, field, "<high>,<caught up 0|1>"} (high empty for none): stored so,
-- but with the higher of the stored and the new high.
local function set_time(op)
  local high, caught_up = string.match(op[4], "^(%-?%d*),([01])$")
  local stored = redis.call("HGET", op[2], op[3])
  local before = stored and string.match(stored, "^(%-?%d+),")
  if before and (high == "" or tonumber(before) > tonumber(high)) then high = before end
  redis.call("HSET", op[2], op[3], high .. "," .. caught_up)
end

-- {GAPCOPY, schedules, due, held, gap, score, held, parent}: see the header.
local function copy_gap(op)
  local score = redis.call("ZSCORE", op[3], op[8])
  local held = op[7] == "1"
  if score then
    local schedule = redis.call("HGET", op[2], op[8])
    if schedule then redis.call("HSET", op[2], op[5], schedule) end
    held = redis.call("SISMEMBER", op[4], op[8]) == 1
  end
  redis.call("ZADD", op[3], score or op[6], op[5])
  redis.call(held and "SADD" or "SREM", op[4], op[5])
end

-- Redis's clock, ms: when a business event was queued (the oldest-pending gauge).
local clock
local function now_ms()
  if not clock then
    local t = redis.call("TIME")
    clock = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  end
  return clock
end

-- {OUTPRUNE, hold hash, ts zset, before}: the held events older than before go.
local function prune_held(op)
  local gone = redis.call("ZRANGEBYSCORE", op[3], "-inf", "(" .. op[4])
  for i = 1, #gone, 1000 do
    local part = {unpack(gone, i, math.min(i + 999, #gone))}
    redis.call("ZREM", op[3], unpack(part))
    redis.call("HDEL", op[2], unpack(part))
  end
end

for _, op in ipairs(batch.ops) do
  if op[1] == "DLADD" then
    -- {DLADD, letters hash, id counter, open set, record JSON}: a new dead letter, numbered here
    local id = redis.call("INCR", op[3])
    redis.call("HSET", op[2], id, op[5])
    redis.call("SADD", op[4], id)
  elseif op[1] == "COSET" then
    redis.call("SET", op[2], op[3])
  elseif op[1] == "COTIME" then
    set_time(op)
  elseif op[1] == "OUTBOX" then
    if redis.call("ZADD", op[2], "NX", "+inf", op[5]) == 1 then
      local n = redis.call("INCR", op[4])
      redis.call("XADD", op[3], n .. "-0", "id", op[5], "topic", op[6], "key", op[7],
        "event", op[8], "at", now_ms())
    end
  elseif op[1] == "OUTHOLD" then
    if redis.call("ZADD", op[3], "NX", op[6], op[5]) == 1 then
      redis.call("HSET", op[2], op[5], redis.call("INCR", op[4]) .. " " .. op[7])
    end
  elseif op[1] == "OUTPRUNE" then
    prune_held(op)
  elseif op[1] == "GAPCOPY" then
    copy_gap(op)
  else
    redis.call(unpack(op))
  end
end
return {"ok"}
