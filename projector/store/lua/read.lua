#!lua flags=no-writes
-- Reads for one batch, one round trip for many keys (the caller WATCHes them first).
-- ARGV[1]: get | hget | hmget | hgetall | smembers | zscore | exists; ARGV[2...]: its arguments.
-- Each key's result is wrapped in a table, since a nil would end a Lua array.
local op, out = ARGV[1], {}
for i, key in ipairs(KEYS) do
  local r
  if op == "get" then r = {redis.call("GET", key)}
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
