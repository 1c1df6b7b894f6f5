#!/usr/bin/env bash
# Benchmark-only environment .venv-trl for `python -m bench.trl rm|ppo` (issue #4):
# our trainers side by side with TRL's. TRL is never a runtime dependency of the project, so
# it lives here and not in pyproject.toml. Idempotent; re-runs are fast (stamp file).
#
# Pins: TRL 1.12.0 is the last release with PPO (`trl.experimental.ppo`, removed after 1.12).
# Its requirements (transformers>=4.56.2, accelerate>=1.4, datasets>=4.7) are met by the
# project's own pins, so torch/transformers/peft/accelerate are the SAME versions as .venv
# (read from pyproject.toml below): both sides of a benchmark run on identical libraries.
set -euo pipefail
cd "$(dirname "$0")/.."

TRL_PIN="trl==1.12.0"
DATASETS_PIN="datasets==4.8.5"  # TRL 1.12 needs >=4.7.0; its trainers take a datasets.Dataset
VENV="${BENCH_VENV:-.venv-trl}"  # override only to try the script in a scratch place
PY="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.bench-installed"
want="$(cat pyproject.toml "$0" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

# The project's pins that the benchmarks import (model stack, protobuf for rlhf.v1, redis for
# rlhf.data), exactly as pyproject.toml states them; grpc, gradio... are not needed here.
# (A regex, not tomllib: the project supports Python 3.10.)
mapfile -t pins < <("$VENV/bin/python" - <<'EOF'
import re
want = {"torch", "transformers", "tokenizers", "safetensors", "peft", "accelerate", "protobuf",
        "redis"}
text = open("pyproject.toml").read().split("[project.optional-dependencies]")[0]
for name, version in re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', text):
    if name in want:
        print(f"{name}=={version}")
EOF
)
if [ "${#pins[@]}" -ne 8 ]; then
  echo "bench-env: expected 8 pins in pyproject.toml, found: ${pins[*]}" >&2
  exit 1
fi
echo "bench-env: installing ${pins[*]} $TRL_PIN $DATASETS_PIN into $VENV" >&2
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch==2.13.0 resolves to the local CPU wheel on the project's machines.
"$VENV/bin/python" -m pip install -q "${pins[@]}" "$TRL_PIN" "$DATASETS_PIN"
# The project itself, without its service dependencies (the benchmarks need none of them).
"$VENV/bin/python" -m pip install -q --no-deps -e .
echo "$want" > "$stamp"
