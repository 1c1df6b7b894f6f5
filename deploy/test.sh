#!/usr/bin/env bash
# The README's test command: set up, lint, run the test suite (benchmarks excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/setup.sh
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
