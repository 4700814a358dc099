-- wrk script for `make bench`: POST /direct/refund with pre-signed bodies.
--
-- BENCH_BODIES names a file of request bodies, one signed envelope per line,
-- each for a different order. Thread k of BENCH_THREADS sends lines k,
-- k + BENCH_THREADS, ... so no two requests name the same order; a thread
-- that runs out starts again from its first line (counted as `wrapped`:
-- those answers are 3003 ALREADY_REFUNDED). done() prints one line,
-- "BENCH_RESULT {json}", with the counts and latency percentiles.

local threads = {}
local next_id = 0

function setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
   table.insert(threads, thread)
end

function init(args)
   local path = os.getenv("BENCH_BODIES")
   local count = tonumber(os.getenv("BENCH_THREADS") or "1")
   bodies = {}
   local line_number = 0
   for line in io.lines(path) do
      if line_number % count == id then
         bodies[#bodies + 1] = line
      end
      line_number = line_number + 1
   end
   position = 0
   wrapped = 0
   approved = 0
   declined = 0
   other = 0
   headers = { ["Content-Type"] = "application/json" }
end

function request()
   position = position + 1
   if position > #bodies then
      position = 1
      wrapped = wrapped + 1
   end
   return wrk.format("POST", "/direct/refund", headers, bodies[position])
end

function response(status, headers, body)
   local code = string.match(body, '"responseCode":"(%d%d%d%d)"')
   if code == "0000" then
      approved = approved + 1
   elseif code ~= nil then
      declined = declined + 1
   else
      other = other + 1
   end
end

function done(summary, latency, requests)
   local approved_all, declined_all, other_all, wrapped_all = 0, 0, 0, 0
   for _, thread in ipairs(threads) do
      approved_all = approved_all + thread:get("approved")
      declined_all = declined_all + thread:get("declined")
      other_all = other_all + thread:get("other")
      wrapped_all = wrapped_all + thread:get("wrapped")
   end
   local errors = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests":%d,"seconds":%.6f,"p50_ms":%.3f,"p99_ms":%.3f,"max_ms":%.3f,' ..
      '"approved":%d,"declined":%d,"other":%d,"wrapped":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\n',
      summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
      latency.max / 1000, approved_all, declined_all, other_all, wrapped_all,
      errors.connect, errors.read, errors.write, errors.status, errors.timeout))
end
