-- POST a fixed JSON body to the URL's path (the minimal endpoint, Flower's async-apply).
-- Usage: wrk -s post.lua <url> -- '<json body>'
function init(args)
  body = args[1] or "{}"
  headers = { ["Content-Type"] = "application/json" }
end

function request()
  return wrk.format("POST", nil, headers, body)
end
