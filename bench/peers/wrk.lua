-- wrk script for bench/compare.sh.
--
-- Always: at the end, one machine-readable line with the request and error
-- counts and the 50th, 99th and 99.9th latency percentiles in microseconds
-- (wrk's --latency table stops at 99 %).
--
-- With WRK_TOKENS=FILE (one JWT a line): each request carries the next
-- token of the file, so the load spreads over as many users as the file
-- has tokens. The requests are formatted once, in init, so rotating costs
-- wrk no more than a fixed request does.

local tokens_file = os.getenv("WRK_TOKENS")

if tokens_file and tokens_file ~= "" then
  local requests = {}
  local next_index = 1
  local thread_count = 0

  function setup(thread)
    thread:set("thread_index", thread_count)
    thread_count = thread_count + 1
  end

  function init(args)
    for line in io.lines(tokens_file) do
      if line ~= "" then
        local headers = {}
        for name, value in pairs(wrk.headers) do headers[name] = value end
        headers["Authorization"] = "Bearer " .. line
        requests[#requests + 1] = wrk.format(nil, nil, headers)
      end
    end
    assert(#requests > 0, "no token in " .. tokens_file)
    -- Threads start half a file apart, so they do not walk in step.
    next_index = (thread_index * math.floor(#requests / 2)) % #requests + 1
  end

  function request()
    local r = requests[next_index]
    next_index = next_index % #requests + 1
    return r
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "COMPARE requests=%d errors=%d duration_us=%d p50_us=%d p99_us=%d p999_us=%d\n",
    summary.requests, e.connect + e.read + e.write + e.status + e.timeout, summary.duration,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
