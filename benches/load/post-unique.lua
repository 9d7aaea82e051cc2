-- wrk script for the relay's queue mode: like post.lua, but every request carries a DISTINCT body,
-- so that the relay's deduplication (body hash for Kaleyra) cannot turn repeats into cheap no-ops.
--
-- The body is body.json (from the current directory) with its event id replaced by a unique one,
--   evt_RRRRRRRRRR_TT_CCCCCCCCCCCC   (R: run id, T: wrk thread, C: per-thread counter)
-- plus a "from" field naming one of CUSTOMERS customer numbers (default 1000; Kaleyra's "from" is the
-- conversation key the relay keeps in order, and one single conversation would serialize delivery).
-- The "pad" string is shortened to keep the body exactly as long as body.json (1024 bytes).
-- Environment: RUN_ID (a number; default the current time; use a new one per wrk run against one
-- relay so that runs don't repeat each other's ids), CUSTOMERS.
-- Building each request in Lua costs wrk some CPU that post.lua doesn't spend: compare req/s with that
-- in mind (wrk shares the cores with the relay).

local f = io.open("body.json", "rb")
local template = f:read("*a")
f:close()

local run = (tonumber(os.getenv("RUN_ID")) or os.time()) % 10000000000
local customers = tonumber(os.getenv("CUSTOMERS")) or 1000

-- Split the template around the first "id" value: {"id":"evt_..."  ->  head .. ID .. tail
local head, old_id, tail = template:match('^(.-"id":")([^"]*)(".*)$')
assert(head, "body.json: no \"id\" field")

local function make_id(tid, n)
  return string.format('evt_%010d_%02d_%012d","from":"+39300%07d', run, tid, n, n % customers)
end

-- Every id has the same length, so trim the pad once by the constant difference.
local delta = #make_id(0, 0) - #old_id
local pad = tail:match('"pad":"(x*)"')
assert(pad and #pad > delta, "body.json: no \"pad\" long enough to absorb the id")
tail = tail:gsub('"pad":"x*"', '"pad":"' .. string.rep("x", #pad - delta) .. '"', 1)
assert(#head + #make_id(0, 0) + #tail == #template)

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Webhook-Token"] = "bench-token"

-- Each wrk thread has its own Lua state; setup() (in the main state) gives each one a number.
-- RELAY_ADDRS ("host:port,host:port"): the threads take the addresses in turn (two relays behind
-- no load balancer: thread 0 on the first, thread 1 on the second, ...).
local addrs = {}
for a in (os.getenv("RELAY_ADDRS") or ""):gmatch("[^,]+") do addrs[#addrs + 1] = a end
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  if #addrs > 0 then
    local host, port = addrs[threads % #addrs + 1]:match("^(.*):(%d+)$")
    thread.addr = wrk.lookup(host, port)[1]
  end
  threads = threads + 1
end

local counter = 0
function request()
  counter = counter + 1
  return wrk.format(nil, nil, nil, head .. make_id(tid or 0, counter) .. tail)
end

done = function(summary, latency, requests)
  local secs = summary.duration / 1e6
  local errs = summary.errors.connect + summary.errors.read + summary.errors.write
             + summary.errors.timeout + summary.errors.status
  io.write(string.format("RESULT rps=%.0f p50_ms=%.3f p99_ms=%.3f max_ms=%.3f requests=%d errors=%d non2xx=%d\n",
    summary.requests / secs, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, summary.requests, errs, summary.errors.status))
end
