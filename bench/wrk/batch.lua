-- POST /v1/jobs/batch, <size> noop jobs per request, each with its own unique idempotency_key.
-- Usage: wrk -s batch.lua <url> -- <key prefix> <size>
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  prefix = (args[1] or "bench") .. "-" .. tostring(tid or 0) .. "-"
  size = tonumber(args[2] or "100")
  n = 0
  headers = { ["Content-Type"] = "application/json" }
end

function request()
  local items = {}
  for i = 1, size do
    n = n + 1
    items[i] = '{"type":"noop","idempotency_key":"' .. prefix .. n .. '"}'
  end
  return wrk.format("POST", "/v1/jobs/batch", headers, '{"jobs":[' .. table.concat(items, ",") .. ']}')
end
