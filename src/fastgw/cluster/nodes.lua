-- fastgw node registry: how many members (gateway processes) are alive, for on-unreachable:
-- hold (a key new to a node while the store is unreachable gets limit / members).
--
-- KEYS[1]  fgw:{nodes}, a sorted set: member -> expiry (server ms)
-- ARGV     member, lease_ms, "leave" to remove the member instead
-- Returns  the live members (the caller included unless it leaves)

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
if ARGV[3] == 'leave' then
    redis.call('ZREM', KEYS[1], ARGV[1])
else
    redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], lease * 2)
return redis.call('ZCARD', KEYS[1])
