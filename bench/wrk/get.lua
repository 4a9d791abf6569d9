-- GET the URL as given (a job's page, as a polling client asks for it): wrk's default request.
-- Usage: wrk -s get.lua <url>
function request()
  return wrk.format("GET")
end
