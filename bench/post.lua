-- wrk script for bench/run: POSTs one body file with one Content-Type, and prints a JSON summary
-- line (requests, errors, latency percentiles in microseconds) that bench/run parses.
--
--   wrk -t1 -c64 -d5s --latency -s bench/post.lua http://127.0.0.1:PORT/async/bench8 -- BODY_FILE CONTENT_TYPE

function init(args)
  local path = args[1]
  local content_type = args[2] or "application/json"
  local f = assert(io.open(path, "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = content_type
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
