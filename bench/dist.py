"""One learner iteration with 1 vs N processes: `rlhf learn` vs `rlhf learn --nproc N`.

    rlhf bench dist [--model starter|smollm2-135m-instruct|DIR] [--procs 2] [--out F]

Each run is a real `rlhf learn` child (CPU, gloo, ``--threads 1`` per process) on its own
data dir, adapter store and Redis db of one private redis-server, fed the same K = 4
comparisons (``kit.records.synthetic_k4``), triggered once over the admin API and timed from the
iteration's own record (``finished_at - started_at``, phase seconds) plus the start-up to
the listening line. Both runs sample the same episodes (``ppo_rollout_groups`` = N, one
minibatch per batch), so the published adapters and the metrics must agree within the
data-parallel check's tolerances (tests/test_learner_ddp.py): the JSON report has the
relative differences next to the wall times. Prints one JSON object (and writes it to
``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import redis
from safetensors.torch import load_file

from bench.kit.children import ROOT, stop_process
from bench.kit.records import synthetic_k4
from bench.kit.report import machine, write_report
from rlhf import comparisons as stream
from rlhf.local_redis import RedisServer

SETTINGS = dict(prompts_per_iteration=16, eval_prompts=4, ptx_eval_texts=4, rm_batch=8,
                rm_max_length=128, rm_heldout_fraction=0.25, ppo_steps=2, ppo_batch_size=8,
                ppo_minibatch_size=8, ppo_max_new_tokens=24, ppo_ptx_coef=0.5,
                progress_bars=False)
SAME = ("rm/train_loss", "rm/accuracy", "rm/loss", "rm/bias", "ppo/kl", "ppo/score",
        "ppo/reward", "ppo/grad_norm", "ppo/response_len", "eval/policy_score", "eval/kl",
        "eval/win_rate", "ptx/loss_before", "ptx/loss_after")
TIMES = ("rm/train_seconds", "time/generate_total_s", "time/score_total_s", "time/train_total_s")


def peak_rss_mb(pid: int) -> float:
    """The most resident memory a process has held (VmHWM), in MiB."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines()
                if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def flags(settings: dict) -> list[str]:
    return [(f"--{k}={v}" if not isinstance(v, bool) else f"--{'' if v else 'no-'}{k}")
            .replace("_", "-") for k, v in settings.items()]


def one_run(model: str, procs: int, url: str, root: Path, settings: dict) -> dict:
    """Start `rlhf learn [--nproc procs]`, run one iteration, stop it: times, metrics."""
    cmd = [sys.executable, "-m", "rlhf.cli", "learn", "--nproc", str(procs), "--model", model,
           "--device", "cpu", "--threads", "1", "--port", "0", "--consumer", f"bench-{procs}",
           "--data-dir", str(root / "data"), "--adapter-store", str(root / "store"),
           *flags(settings)]
    env = {**os.environ, "RLHF_LEARN_REDIS_URL": url, "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = root / "learn.log"
    start = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err,
                                text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"rlhf learn exited:\n{log.read_text()[-3000:]}")
        event, startup = json.loads(line), time.perf_counter() - start
        pids = [r["pid"] for r in event["ranks"]]
        cpu = [cpu_seconds(pid) for pid in pids]
        with httpx.Client(base_url=f"http://127.0.0.1:{event['port']}", timeout=60) as http:
            iteration = http.post("/v1/iterations").json()["id"]
            while (body := http.get(f"/v1/iterations/{iteration}").json()
                   )["status"] == "running":
                time.sleep(0.5)
        cpu = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu, strict=True)]
        rss = [peak_rss_mb(pid) for pid in pids]
        if body["status"] != "done":
            raise RuntimeError(f"iteration {body['status']}: {body.get('error')}")
    finally:
        stop_process(proc, 60.0)
    return {"procs": procs, "ranks": len(pids), "startup_s": startup,
            "iteration_s": body["finished_at"] - body["started_at"],
            "cpu_s_per_rank": cpu, "peak_rss_mb_per_rank": rss, "phase_s": body["seconds"],
            "times": {k: body["metrics"].get(k) for k in TIMES}, "metrics": body["metrics"],
            "adapter": str(root / "store" / body["version"] / "adapter_model.safetensors")}


def rel(a: dict, b: dict, keys: list[str]) -> float:
    num = sum(((a[k] - b[k]) ** 2).sum().item() for k in keys)
    return (num / max(sum((b[k] ** 2).sum().item() for k in keys), 1e-30)) ** 0.5


def compare(one: dict, many: dict) -> dict:
    a, b = load_file(many["adapter"]), load_file(one["adapter"])
    m1, m2 = one["metrics"], many["metrics"]
    return {"adapter_lora_B_rel": rel(a, b, [k for k in a if "lora_B" in k]),
            "adapter_lora_A_rel": rel(a, b, [k for k in a if "lora_A" in k]),
            "metrics_max_rel": max(abs(m2[k] - m1[k]) / max(abs(m1[k]), 1e-6) for k in SAME)}


def run(args: argparse.Namespace) -> dict:
    settings = {**SETTINGS, "ppo_rollout_groups": args.procs}
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        server = RedisServer(Path(tmp) / "redis")
        server.start()
        runs = []
        try:
            for db, procs in enumerate((1, args.procs), start=1):
                client = redis.Redis.from_url(server.db_url(db))
                stream.append_many(client, synthetic_k4(args.comparisons, seed=0))
                client.close()
                (Path(tmp) / str(procs)).mkdir()
                runs.append(one_run(args.model, procs, server.db_url(db), Path(tmp) / str(procs),
                                    settings))
            agreement = compare(runs[0], runs[1])  # before the stores are removed
        finally:
            server.stop()
    return {"model": args.model or "starter", "threads_per_process": 1,
            "machine": machine("torch", load_average=os.getloadavg()[0]),
            "settings": settings, "comparisons": args.comparisons,
            "runs": [{k: v for k, v in r.items() if k not in ("adapter", "metrics")}
                     | {"metrics": {k: r["metrics"].get(k) for k in SAME}} for r in runs],
            "speedup": runs[0]["iteration_s"] / runs[1]["iteration_s"],
            # on a loaded machine: what N free cores would give
            "cpu_bound_speedup": max(runs[0]["cpu_s_per_rank"])
            / max(runs[1]["cpu_s_per_rank"]),
            **agreement}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf bench dist",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="as `rlhf learn --model` (empty: starter)")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--comparisons", type=int, default=48)
    parser.add_argument("--out", default="", help="also write the JSON report here")
    args = parser.parse_args(argv)
    write_report(run(args), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
