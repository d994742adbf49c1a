-- Like post.lua, at a constant rate: BENCH_RATE requests/s over all threads. Each thread keeps
-- a schedule of send slots; a connection that becomes free late takes the next slot at once,
-- and the largest lag behind the schedule is reported (max_behind_ms): when it stays small
-- the latencies are those of a constant-rate client (no coordinated omission).
local ffi = require("ffi")
ffi.cdef[[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

dofile(os.getenv("BENCH_SCRIPTS") .. "/post.lua")

local rate = tonumber(os.getenv("BENCH_RATE"))
local nthreads = tonumber(os.getenv("BENCH_THREADS") or "1")
local interval = 1000 * nthreads / rate
local next_slot = nil
behind = 0

function delay()
  local now = now_ms()
  if next_slot == nil then next_slot = now end
  local slot = next_slot
  next_slot = next_slot + interval
  if now - slot > behind then behind = now - slot end
  if slot > now then return math.floor(slot - now) end
  return 0
end

local post_done = done
function done(summary, latency, requests)
  local worst = 0
  for _, thread in ipairs(bench_threads) do
    local b = thread:get("behind")
    if b > worst then worst = b end
  end
  io.write(string.format('PACED {"max_behind_ms":%.1f}\n', worst))
  post_done(summary, latency, requests)
end
