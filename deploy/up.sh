#!/usr/bin/env bash
# The README's run command: set up, build the starter model if needed, run the system.
# For now that is the policy server (gRPC :50051, OpenAI-compatible HTTP :8000).
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/setup.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" GRADIO_ANALYTICS_ENABLED=False
exec .venv/bin/rlhf serve "$@"
