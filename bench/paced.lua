-- phones.lua at the pace of real phones: each connection waits a random 0..MAX_MS
-- (mean MAX_MS / 2) after an answer before its next request, so the fleet is
-- out of step, as phones polling on their own timers are.
--   wrk ... -s paced.lua URL -- METHOD PATH PHONES PARAMS MAX_MS
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "phones.lua")

local phones_init = init

function init(args)
   phones_init(args)
   max_pause = tonumber(args[5])
   math.randomseed(os.time() + tid)
end

function delay()
   return math.random(0, max_pause)
end
