#!/usr/bin/env bash
# The README's run command: set up, then run Redis (private, AOF on), the policy server
# (gRPC :50051, OpenAI-compatible HTTP :8000, Feedback API, adapter hot-swap), the learner
# (admin API :8100) and the ranking UI (:7860). Ctrl-C stops everything.
#   RLHF_MODEL      hub id or local directory of the base model (default: the starter model)
#   RLHF_UI_USERS   labeler accounts (default demo:demo)
#   RLHF_REDIS_URL  use this Redis instead of a private one
#   RLHF_DATA_DIR   where Redis data, the learner's dataset and the adapters live (default .rlhf)
#   extra arguments go to `rlhf serve` (e.g. --load-in-4bit --auth-token ...)
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/setup.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" GRADIO_ANALYTICS_ENABLED=False
data="${RLHF_DATA_DIR:-$PWD/.rlhf}"
mkdir -p "$data/redis"
pids=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

redis_url="${RLHF_REDIS_URL:-}"
if [ -z "$redis_url" ]; then
  port="${RLHF_REDIS_PORT:-6390}"
  redis-server deploy/redis.conf --port "$port" --bind 127.0.0.1 --dir "$data/redis" \
    --daemonize no --logfile "$data/redis/redis.log" &
  pids+=($!)
  redis_url="redis://127.0.0.1:$port/0"
fi

model="${RLHF_MODEL:-}"
wait_for() {  # wait_for FILE PATTERN NAME: until the child prints PATTERN (or dies)
  until grep -q "$2" "$1" 2>/dev/null; do
    kill -0 "${pids[-1]}" 2>/dev/null || { echo "up: $3 exited" >&2; exit 1; }
    sleep 1
  done
}
echo "up: building/loading the model (first run builds the starter model: a few minutes)" >&2
[ -n "$model" ] || .venv/bin/rlhf starter-model >/dev/null  # cached after the first build
.venv/bin/rlhf serve --model "$model" --redis-url "$redis_url" \
  --adapter-store "$data/adapters" "$@" > "$data/serve.events" &
pids+=($!)
wait_for "$data/serve.events" '"ready"' "rlhf serve"
echo "up: serving  gRPC 127.0.0.1:50051  HTTP http://127.0.0.1:8000/v1  (Redis $redis_url)" >&2
.venv/bin/rlhf learn --model "$model" --redis-url "$redis_url" --data-dir "$data/learner" \
  --adapter-store "$data/adapters" > "$data/learn.events" &
pids+=($!)
wait_for "$data/learn.events" '"listening"' "rlhf learn"
echo "up: learner admin API http://127.0.0.1:8100  (trigger: .venv/bin/rlhf learner trigger)" >&2
echo "up: ranking UI http://127.0.0.1:7860  (accounts: ${RLHF_UI_USERS:-demo:demo})" >&2
RLHF_UI_USERS="${RLHF_UI_USERS:-demo:demo}" .venv/bin/rlhf ui &
pids+=($!)
wait -n "${pids[@]}"
