-- POST one body file as fast as the connections allow; a unique Idempotency-Key per request.
-- Environment: BENCH_BODY (file), BENCH_PATH, BENCH_KEY (bearer key, optional),
-- BENCH_GZIP=1 (body is gzip), BENCH_IDEMPOTENCY=1 (send Idempotency-Key).
-- Prints one JSON line at the end: requests, non-202 answers, latency percentiles (us).

-- Globals, not locals: the main state reads them from each thread with thread:get().
bench_threads = {}
counter = 0
prefix = ""
bad = 0
statuses = {}

local function readfile(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  return data
end

local body = readfile(os.getenv("BENCH_BODY"))
local path = os.getenv("BENCH_PATH") or "/"
local headers = {["Content-Type"] = "application/json"}
if os.getenv("BENCH_KEY") then headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY") end
if os.getenv("BENCH_GZIP") == "1" then headers["Content-Encoding"] = "gzip" end
local idempotency = os.getenv("BENCH_IDEMPOTENCY") == "1"
local run = os.getenv("BENCH_RUN") or tostring(os.time())

function setup(thread)
  thread:set("prefix", run .. "-" .. #bench_threads)
  table.insert(bench_threads, thread)
end

function request()
  if idempotency then
    counter = counter + 1
    headers["Idempotency-Key"] = prefix .. "-" .. counter
  end
  return wrk.format("POST", path, headers, body)
end

function response(status, hdrs, resp_body)
  if status ~= 202 then
    bad = bad + 1
    statuses[status] = (statuses[status] or 0) + 1
  end
end

function done(summary, latency, requests)
  local non202 = 0
  local by_status = {}
  for _, thread in ipairs(bench_threads) do
    non202 = non202 + thread:get("bad")
    local s = thread:get("statuses")
    for code, n in pairs(s) do
      by_status[tostring(code)] = (by_status[tostring(code)] or 0) + n
    end
  end
  local parts = {}
  for code, n in pairs(by_status) do table.insert(parts, string.format('"%s":%d', code, n)) end
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"non202":%d,"socket_errors":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"statuses":{%s}}\n',
    summary.requests, summary.duration, non202,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    table.concat(parts, ",")))
end
