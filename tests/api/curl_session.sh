#!/usr/bin/env bash
# A client in another language: create a key with the CLI, enqueue with curl, follow the job's
# Server-Sent Events with `curl -N` until the terminal event, then get the job.
# Needs: REFRAME_* of the cluster in the environment, API_URL, VIDEO_URL, REFRAME (the CLI command).
set -euo pipefail
TOKEN=$($REFRAME keys create --tenant curl --scope enqueue --scope read --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
AUTH="Authorization: Bearer $TOKEN"
CREATED=$(curl -sS --fail-with-body -X POST "$API_URL/v1/jobs" -H "$AUTH" -H 'Content-Type: application/json' \
  -H "Idempotency-Key: curl-$$" -d "{\"video_url\": \"$VIDEO_URL\", \"aspect_ratio\": \"9:16\"}")
JOB_ID=$(printf '%s' "$CREATED" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "job $JOB_ID"
# -N: no buffering; the server ends the stream at the terminal state
curl -sS -N --max-time 120 "$API_URL/v1/jobs/$JOB_ID/events" -H "$AUTH" > events.txt
tail -n 3 events.txt
curl -sS --fail-with-body "$API_URL/v1/jobs/$JOB_ID" -H "$AUTH" > job.json
python3 -c 'import json; j=json.load(open("job.json")); print(j["state"], j["video_url"])'
