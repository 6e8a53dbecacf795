#!/usr/bin/env bash
# Start (or find already running) the MLflow tracking server on the Ray head node.
#
#   cluster/start_mlflow.sh            # sqlite + local artifacts under ~/mlflow, port 5000
#   cluster/start_mlflow.sh stop       # stop the server this script started (its process group)
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:PASS@db-host:5432/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://my-bucket/mlflow cluster/start_mlflow.sh
#
# Backend store: sqlite is right for a small team (one server process serialises the writes;
# sslray only writes from the job driver). Use postgres once many users or many parallel Tune
# trials log at once. Artifacts (config.yaml, curves.png, probe reports) go through the server
# (--serve-artifacts) to --artifacts-destination: a shared mount or s3:// / gs://, so clients
# need no bucket credentials, only the server does.
# Every job then needs MLFLOW_TRACKING_URI=http://<head-ip>:<port>; the cluster configs export it
# before `ray start`; for another server pass `sslray submit --env MLFLOW_TRACKING_URI=http://...`.
set -euo pipefail

STATE_DIR="${MLFLOW_STATE_DIR:-$HOME/mlflow}"
PORT="${MLFLOW_PORT:-5000}"
HOST="${MLFLOW_HOST:-0.0.0.0}"
BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$STATE_DIR/mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-$STATE_DIR/artifacts}"
WORKERS="${MLFLOW_WORKERS:-2}"
# Host headers the server accepts (DNS-rebinding guard). MLflow's default is localhost + private
# IPs; add service names such as a KubeRay head Service: MLFLOW_ALLOWED_HOSTS='sslray-head-svc*'.
ALLOWED_HOSTS="${MLFLOW_ALLOWED_HOSTS:-}"
PID_FILE="$STATE_DIR/server.pid"
LOG_FILE="$STATE_DIR/server.log"

mkdir -p "$STATE_DIR"
case "$ARTIFACTS" in *://*) ;; *) mkdir -p "$ARTIFACTS" ;; esac

url="http://127.0.0.1:$PORT"
if [[ "${1:-}" == stop ]]; then
  if [[ -f "$PID_FILE" ]] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
    pid="$(cat "$PID_FILE")"
    kill -TERM -- "-$pid"
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid"
    echo "start_mlflow: stopped pid $pid"
  else
    echo "start_mlflow: not running"
  fi
  rm -f "$PID_FILE"
  exit 0
fi
if [[ -f "$PID_FILE" ]] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
  echo "start_mlflow: already running (pid $(cat "$PID_FILE")) at $url"
else
  args=(server --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" --serve-artifacts
        --host "$HOST" --port "$PORT" --workers "$WORKERS")
  [[ -n "$ALLOWED_HOSTS" ]] && args+=(--allowed-hosts "$ALLOWED_HOSTS")
  # Own session: `stop` ends the server and its gunicorn/uvicorn workers together.
  setsid nohup mlflow "${args[@]}" >>"$LOG_FILE" 2>&1 &
  echo $! >"$PID_FILE"
  echo "start_mlflow: started pid $! (backend $BACKEND, artifacts $ARTIFACTS, log $LOG_FILE)"
fi

# Wait until it answers (the first sqlite/postgres migration takes a few seconds).
for _ in $(seq 1 120); do
  if python - "$url/health" <<'PY' 2>/dev/null; then
import sys, urllib.request
sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)
PY
    ip="$HOST"
    [[ "$HOST" == 0.0.0.0 ]] && ip="$(hostname -I 2>/dev/null | awk '{print $1}')"
    echo "start_mlflow: ready. For jobs: export MLFLOW_TRACKING_URI=http://${ip:-<head-ip>}:$PORT"
    exit 0
  fi
  if ! kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
    echo "start_mlflow: server exited; last lines of $LOG_FILE:" >&2
    tail -n 20 "$LOG_FILE" >&2
    exit 1
  fi
  sleep 1
done
echo "start_mlflow: no answer from $url/health after 120 s; see $LOG_FILE" >&2
exit 1
