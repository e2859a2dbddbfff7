-- wrk script: POST /v1/download/check with a JSON body (an available file in mock mode).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"file_id": 70000}'
