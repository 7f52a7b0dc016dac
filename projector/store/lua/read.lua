#!lua flags=no-writes
-- Reads for one batch, one round trip for many keys (the caller WATCHes them first, but
-- projector's own stream hashes: the batch script checks their version token, field v).
-- ARGV[1]: get | hget | hmget | hgetall | smembers | zscore | exists; ARGV[2...]: its arguments.
-- Two for projector's own stream hashes: "stream" is HGETALL with every parked event's value
-- ("p:<seq>") left out, "" in its place (a batch loads only the parked events it can meet);
-- "fields" is an HMGET per key, ARGV[2...] being, per key, a count and that many fields.
-- Each key's result is wrapped in a table, since a nil would end a Lua array.
local op, out = ARGV[1], {}
local at = 2
for i, key in ipairs(KEYS) do
  local r
  if op == "stream" then
    r = redis.call("HGETALL", key)
    for j = 1, #r, 2 do
      if string.sub(r[j], 1, 2) == "p:" then r[j + 1] = "" end
    end
  elseif op == "fields" then
    local n = tonumber(ARGV[at])
    r = n > 0 and redis.call("HMGET", key, unpack(ARGV, at + 1, at + n)) or {}
    at = at + n + 1
  elseif op == "get" then r = {redis.call("GET", key)}
  elseif op == "hget" then r = {redis.call("HGET", key, ARGV[2])}
  elseif op == "hmget" then r = redis.call("HMGET", key, unpack(ARGV, 2))
  elseif op == "hgetall" then r = redis.call("HGETALL", key)
  elseif op == "smembers" then r = redis.call("SMEMBERS", key)
  elseif op == "zscore" then r = {redis.call("ZSCORE", key, ARGV[2])}
  elseif op == "exists" then r = {redis.call("EXISTS", key)}
  else return redis.error_reply("unknown read " .. tostring(op)) end
  out[i] = r
end
return out
