#!/usr/bin/env bash
# A consumer's session with nothing but curl and jq, following docs/contract/README.md: launch a
# request, poll its run to the end, print its artifacts and events, list the request's runs.
#
#   docs/contract/examples/curl-session.sh [LAUNCH_VARIABLES_JSON]
#
# ERGOT_DAGSTER_URL is the plane (default http://127.0.0.1:3000); TIMEOUT_S bounds the wait.
set -euo pipefail
URL=${ERGOT_DAGSTER_URL:-http://127.0.0.1:3000}
HERE=$(cd "$(dirname "$0")" && pwd)
QUERIES=$HERE/../queries
LAUNCH=${1:-$HERE/launch.json}

# gql DOCUMENT VARIABLES: post docs/contract/queries/DOCUMENT.graphql, print the answer's data.
gql() {
  jq -n --rawfile query "$QUERIES/$1.graphql" --argjson variables "$2" \
    '{query: $query, variables: $variables}' |
    curl -sS --fail "$URL/graphql" -H 'content-type: application/json' --data-binary @- |
    jq -e 'if .errors then error(.errors[0].message) else .data end'
}

launched=$(gql Launch "$(cat "$LAUNCH")")
run_id=$(jq -r '.launchRun.run.runId // error("not launched: \(.launchRun)")' <<<"$launched")
echo "run $run_id"

deadline=$((SECONDS + ${TIMEOUT_S:-300}))
while :; do
  status=$(gql RunState "{\"runId\": \"$run_id\"}" | jq -r .runOrError.status)
  case $status in SUCCESS | FAILURE | CANCELED) break ;; esac
  if ((SECONDS >= deadline)); then
    echo "run $run_id is still $status" >&2
    exit 1
  fi
  sleep 1
done
echo "status $status"

# Each artifact: its asset, its ref and sha256 (the whole manifest is the `manifest` entry).
gql Run "{\"runId\": \"$run_id\"}" | jq -r '.runOrError.assetMaterializations[] |
  (.metadataEntries | map({key: .label, value: (.text // .jsonString)}) | from_entries) as $m |
  "artifact \(.assetKey.path | join("/")) \($m.ref) \($m.sha256)"'

# The plane's own events carry their kind in the `ergot_event` metadata entry.
gql RunEvents "{\"runId\": \"$run_id\", \"limit\": 1000}" | jq -r '.logsForRun.events[] |
  select(.metadataEntries) |
  (.metadataEntries | map({key: .label, value: .text}) | from_entries) as $m |
  select($m.ergot_event) | "event \($m.ergot_event) \(.message)"'

request_id=$(jq -r '.params.executionMetadata.tags[] | select(.key == "ergot/request_id") |
  .value' "$LAUNCH")
gql Runs "{\"filter\": {\"tags\": [{\"key\": \"ergot/request_id\", \"value\": \"$request_id\"}]},
  \"limit\": 10}" | jq -r '.runsOrError.results[] | "request run \(.runId) \(.status)"'
