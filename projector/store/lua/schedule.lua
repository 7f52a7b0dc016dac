#!lua
-- The gap timer's writes: a gap's replay schedule, set only if it is still what the caller
-- read (compare-and-set), in the schedule hash, not in the stream hash that batches plan on:
-- so a claim never makes a batch planned meanwhile plan again (see redis.py, gapsched).
-- KEYS: gaps (zset: the open and held gaps), gapdue (zset), gapheld (set), gapsched (hash).
-- ARGV, five per gap: its member, its schedule as read ("" for none), the new schedule ("":
-- only forget the gap if it is gone), its next request time (a score), "1" if held else "0".
-- Returns per gap: "ok" (set), "moved" (another writer set it since the read: left as it
-- is), or "gone" (no longer an open or held gap: its index entries and schedule removed).
local types = {"zset", "zset", "set", "hash"}
for i, key in ipairs(KEYS) do
  local have = redis.call("TYPE", key)["ok"]
  if have ~= "none" and have ~= types[i] then
    return redis.error_reply("WRONGTYPE: " .. key .. " is a " .. have .. ", not a " .. types[i])
  end
end
local out = {}
for i = 1, #ARGV, 5 do
  local member, read, new = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if not redis.call("ZSCORE", KEYS[1], member) then
    redis.call("ZREM", KEYS[2], member)
    redis.call("SREM", KEYS[3], member)
    redis.call("HDEL", KEYS[4], member)
    out[#out + 1] = "gone"
  elseif new == "" or (redis.call("HGET", KEYS[4], member) or "") ~= read then
    out[#out + 1] = "moved"
  else
    redis.call("HSET", KEYS[4], member, new)
    redis.call("ZADD", KEYS[2], ARGV[i + 3], member)
    redis.call(ARGV[i + 4] == "1" and "SADD" or "SREM", KEYS[3], member)
    out[#out + 1] = "ok"
  end
end
return out
