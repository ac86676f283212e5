-- fastgw lease renewal: one call per (node, key) per refresh. The protocol and its safety
-- argument are in lease.py's docstring; this file only does what it says.
--
-- KEYS[1]  the key's hash, fgw:{K}: fields `_run` (run_id of the server that last wrote it),
--          `_learn` (server ms until which the key learns), `_pool` (buckets: "tokens ms", the
--          unreserved tokens and when they were counted), and one field per member
--          "res demand exp seq" (numbers separated by spaces).
-- ARGV     member, seq, limit, integer (1: counts, 0: buckets), demand, applied, used, lease_ms,
--          burst (buckets; 0 for counts), returned (buckets: tokens the node gives back to
--          the pool; optional, 0)
-- Returns  {grant (string), expires_ms, learning (0/1), status (0: applied, 1: stale: ignore),
--           credit (string: tokens the node may add to its bucket as its share grows),
--           members (the live members, the caller included),
--           wanting (1: another live member wants more than it reserves)}

if redis.replicate_commands then redis.replicate_commands() end

local key = KEYS[1]
local member = ARGV[1]
local seq = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local integer = ARGV[4] == '1'
local demand = tonumber(ARGV[5])
local applied = tonumber(ARGV[6])
local used = tonumber(ARGV[7])
local lease = tonumber(ARGV[8])
local burst = tonumber(ARGV[9] or '0')
local returned = math.max(0, tonumber(ARGV[10] or '0') or 0)

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local info = redis.call('INFO', 'server')
local run = string.match(info, 'run_id:(%x+)')
local uptime = tonumber(string.match(info, 'uptime_in_seconds:(%d+)'))

local flat = redis.call('HGETALL', key)
local learn = 0
local stored_run = nil
local pool, stamp = nil, nil
local before = 0                            -- the sum of the reservations as read (expired too)
local names, res, dem = {}, {}, {}
local mine = nil
local last = 0                              -- the latest expiry of the others' live entries
local dead = {}
for i = 1, #flat, 2 do
    local f, v = flat[i], flat[i + 1]
    if f == '_run' then
        stored_run = v
    elseif f == '_learn' then
        learn = tonumber(v)
    elseif f == '_pool' then
        local p, m = string.match(v, '^(%S+) (%S+)$')
        pool, stamp = tonumber(p), tonumber(m)
    else
        local r, d, e, s = string.match(v, '^(%S+) (%S+) (%S+) (%S+)$')
        if f == member then
            if tonumber(s) >= seq then
                return {'0', 0, 0, 1, '0', 0, 0}  -- stale: a newer call of this member ran first
            end
        end
        before = before + tonumber(r)
        if tonumber(e) <= now then
            dead[#dead + 1] = f
        elseif f == member then
            mine = tonumber(r)
        else
            names[#names + 1] = f
            last = math.max(last, tonumber(e))
            res[#res + 1] = tonumber(r)
            dem[#dem + 1] = tonumber(d)
        end
    end
end
if #dead > 0 then redis.call('HDEL', key, unpack(dead)) end

-- Learning: the server started less than a lease ago, or the hash was written by another
-- server process (a restart with persistence, a failover), or a member that applies a share
-- has no entry (the hash was lost: flushed, evicted).
-- INFO's uptime is the difference of two whole-second clock readings (now's and the start's,
-- both truncated), so the server may have run for as little as uptime - 1 seconds (a server
-- 50 ms old can say 1): the start is taken to be that late.
local fresh = #flat == 0
local since = math.max(0, uptime - 1) * 1000
if uptime == 0 or since < lease then learn = math.max(learn, now - since + lease) end
if stored_run ~= nil and stored_run ~= run then learn = math.max(learn, now + lease) end
if mine == nil and applied > 0 and now >= learn then learn = now + lease end
local learning = now < learn

-- Max-min fair share of `limit` among the live members' demands (the caller's is new).
names[#names + 1] = member
dem[#dem + 1] = demand
local order = {}
for i = 1, #dem do order[i] = i end
table.sort(order, function(a, b)
    if dem[a] ~= dem[b] then return dem[a] < dem[b] end
    return names[a] < names[b]
end)
local me = #dem
local target = nil
local left = limit
local n = #order
for k = 1, n do
    local i = order[k]
    local share = left / (n - k + 1)
    if dem[i] <= share then                         -- satisfied: gets its demand
        if i == me then target = dem[i] break end
        left = left - dem[i]
    else                                            -- this one and all after: the level
        if integer then
            local rest = n - k + 1
            local level = math.floor(left / rest)
            local extra = left - level * rest       -- one more each for the first `extra` by name
            local unsat = {}
            for j = k, n do unsat[#unsat + 1] = names[order[j]] end
            table.sort(unsat)
            target = level
            for j = 1, extra do
                if unsat[j] == member then target = level + 1 end
            end
        else
            target = share
        end
        break
    end
end

local other = 0
local wanting = 0
for i = 1, #res do
    other = other + res[i]
    if dem[i] > res[i] then wanting = 1 end
end
local grant = math.min(target, limit - other)
if learning then grant = math.min(grant, applied) end
grant = math.max(grant, used, 0)
local reserve = math.max(grant, applied)

-- Buckets: the pool of tokens no node holds. A fresh hash outside learning is a full bucket (the
-- hash outlives every lease and a full refill, below); while learning it is empty and does not
-- refill (the reservations are not all known). It refills at the unreserved rate, up to the
-- unreserved burst; a node's returned tokens go back into it; a grant above what the node
-- applied takes its credit from it.
local credit = 0
if not integer and limit > 0 then
    if learning then
        pool, stamp = 0, now
    elseif pool == nil then
        if fresh then pool = burst else pool = 0 end
        stamp = now
    end
    local free_before = math.max(0, 1 - before / limit)
    pool = pool + math.max(0, now - stamp) / 1000 * limit * free_before
    if not learning and mine ~= nil then     -- returned from within the caller's reservation
        pool = pool + math.min(returned, math.max(0, mine - applied) / limit * burst)
    end
    local grow = math.max(0, grant - applied) / limit * burst
    credit = math.min(grow, pool)
    pool = pool - credit
    pool = math.min(pool, math.max(0, 1 - (other + reserve) / limit) * burst)
    redis.call('HSET', key, '_pool', string.format('%.17g %d', pool, now))
end
local expires = now + lease

local function num(x)
    if integer then return string.format('%d', x) end
    return string.format('%.17g', x)
end
redis.call('HSET', key, member, num(reserve) .. ' ' .. num(demand) .. ' '
           .. string.format('%d %d', expires, seq), '_run', run)
local keep = math.max(lease, last - now)
if not integer and limit > 0 then keep = keep + math.ceil(burst / limit * 1000) end
if learn > now then
    redis.call('HSET', key, '_learn', string.format('%d', learn))
    keep = math.max(keep, learn - now)
end
redis.call('PEXPIRE', key, keep)
return {num(grant), expires, learning and 1 or 0, 0, string.format('%.17g', credit), #names,
        wanting}
