#!/usr/bin/env bash
# `make dev`: the Dagster webserver and daemon, with a ComfyUI for the comfyui-local target.
#
# comfyui-local (runtime_targets.yaml) is a ComfyUI on this node at 127.0.0.1:$COMFYUI_PORT.
# When one answers there (a real ComfyUI), it is used. When none does, this starts the
# protocol stand-in (tests/servers/comfyui_server.py: ComfyUI's HTTP and websocket protocol,
# real files made with ffmpeg, but no diffusion model: generated images are seeded gradients and
# "motion" is a pan over the seed), so that the ComfyUI workflows can be tried end to end on a
# machine without a GPU. It stops with `make dev`.
set -euo pipefail

BIN=${BIN:-.venv/bin}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-3000}
COMFYUI_PORT=${COMFYUI_PORT:-8188}
REPO=$(pwd)

standin=""
cleanup() {
  if [[ -n "$standin" ]]; then
    kill "$standin" 2>/dev/null || true
    wait "$standin" 2>/dev/null || true
  fi
}
trap cleanup EXIT INT TERM

if [[ -n "${ERGOT_TARGET_COMFYUI_LOCAL_ENDPOINT:-}" ]]; then
  echo "comfyui-local: using the ComfyUI that ERGOT_TARGET_COMFYUI_LOCAL_ENDPOINT names"
elif curl -fsS --max-time 2 "http://127.0.0.1:${COMFYUI_PORT}/system_stats" >/dev/null 2>&1; then
  echo "comfyui-local: using the ComfyUI at 127.0.0.1:${COMFYUI_PORT}"
else
  echo "comfyui-local: no ComfyUI at 127.0.0.1:${COMFYUI_PORT}; starting the protocol stand-in (no model)"
  "$BIN/python" -m tests.servers.comfyui_server --port "$COMFYUI_PORT" --step-seconds 0.02 \
    > "$ERGOT_HOME/comfyui-standin.log" 2>&1 &
  standin=$!
  for _ in $(seq 1 100); do
    curl -fsS --max-time 1 "http://127.0.0.1:${COMFYUI_PORT}/system_stats" >/dev/null 2>&1 && break
    if ! kill -0 "$standin" 2>/dev/null; then
      echo "the stand-in did not start; see $ERGOT_HOME/comfyui-standin.log" >&2
      standin=""
      break
    fi
    sleep 0.1
  done
fi
export ERGOT_TARGET_COMFYUI_LOCAL_ENDPOINT=${ERGOT_TARGET_COMFYUI_LOCAL_ENDPOINT:-http://127.0.0.1:${COMFYUI_PORT}}

# Started from ERGOT_HOME so that Dagster does not mistake the repository's dagster.yaml (the
# template copied into DAGSTER_HOME) for the instance's own.
cd "$ERGOT_HOME"
"$REPO/$BIN/dagster" dev --host "$HOST" --port "$PORT" -w "$REPO/workspace.yaml"
