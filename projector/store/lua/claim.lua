#!lua
-- Claim partitions: a new epoch each (fencing out the previous owner), and the stored
-- checkpoint to seek to. KEYS: epochs, offsets, owners. ARGV: owner, then partition fields.
local out = {}
for i = 2, #ARGV do
  local epoch = redis.call("HINCRBY", KEYS[1], ARGV[i], 1)
  redis.call("HSET", KEYS[3], ARGV[i], ARGV[1])
  out[#out + 1] = {epoch, redis.call("HGET", KEYS[2], ARGV[i])}
end
return out
