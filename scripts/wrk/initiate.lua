-- wrk script: POST /v1/download/initiate, one new job per request.
-- The id is not a multiple of 7, so in mock mode the file is unavailable and the worker fails the
-- job at once (kind validation): the run measures the HTTP face and job creation, not zip writing.
-- INITIATE_AVAILABLE=1 in the environment uses available files instead (the worker then builds zips).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local available = os.getenv("INITIATE_AVAILABLE") == "1"

request = function()
  local id = 7 * math.random(1430, 14285)
  if not available then id = id + 1 end
  return wrk.format(nil, nil, nil, '{"file_ids": [' .. id .. ']}')
end
