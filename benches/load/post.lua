-- wrk script (copied from the shared bench's post.lua): POST the ~1 KiB JSON in body.json (read from the
-- current directory) with the relay's webhook token; print a machine-readable summary line at the end.
-- The token header is sent to every target (Motion and nginx ignore it) so all carry the same bytes.
local f = io.open("body.json", "rb")
wrk.method = "POST"
wrk.body   = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Webhook-Token"] = "bench-token"

done = function(summary, latency, requests)
  local secs = summary.duration / 1e6
  local errs = summary.errors.connect + summary.errors.read + summary.errors.write
             + summary.errors.timeout + summary.errors.status
  io.write(string.format("RESULT rps=%.0f p50_ms=%.3f p99_ms=%.3f max_ms=%.3f requests=%d errors=%d non2xx=%d\n",
    summary.requests / secs, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, summary.requests, errs, summary.errors.status))
end
