-- POST /v1/jobs, one noop job per request, each with a unique Idempotency-Key.
-- Usage: wrk -s single.lua <url> -- <key prefix>
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  prefix = (args[1] or "bench") .. "-" .. tostring(tid or 0) .. "-"
  n = 0
  headers = { ["Content-Type"] = "application/json" }
end

function request()
  n = n + 1
  headers["Idempotency-Key"] = prefix .. n
  return wrk.format("POST", "/v1/jobs", headers, '{"type":"noop"}')
end
