-- Shared by phones.lua and cycle.lua (loaded with dofile): the phones' identities,
-- counting answers that are not {"code":200,...}, and the BENCH line run.py parses.

-- Phone i (1..N) of the fleet run.py registered; the same formulas as imsi()/iccid() there.
function phone_query(i)
   return string.format("imsi=46000%010d&iccid=898600%014d", i, i)
end

form = { ["Content-Type"] = "application/x-www-form-urlencoded" }

-- Per thread: answers that failed (HTTP status or envelope code not 200), and
-- answers that closed the connection (wrk then reconnects).
failed, closes = 0, 0

function count(status, headers, body)
   if status ~= 200 or not string.find(body, '"code":200', 1, true) then
      failed = failed + 1
   end
   local connection = headers["Connection"] or headers["connection"] or ""
   if string.lower(connection) == "close" then
      closes = closes + 1
   end
end

local threads = {}

function setup(thread)
   thread:set("tid", #threads)
   table.insert(threads, thread)
end

function done(summary, latency, requests)
   local total_failed, total_closes = 0, 0
   for _, thread in ipairs(threads) do
      total_failed = total_failed + thread:get("failed")
      total_closes = total_closes + thread:get("closes")
   end
   local e = summary.errors
   io.write(string.format(
      "BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d failed=%d closes=%d socket_errors=%d\n",
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
      total_failed, total_closes, e.connect + e.read + e.write + e.timeout))
end
