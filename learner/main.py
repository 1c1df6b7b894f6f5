"""The learner process (`rlhf learn`) and its operator client (`rlhf learner ...`).

``run``: config -> load the base model once -> Learner -> admin API (uvicorn) and, when
``auto_trigger_after`` > 0, a thread that starts an iteration once that many new comparisons
arrived. Prints one JSON line ``{"event": "listening", "port": N, "resumed_from": version or
null, ...}`` on stdout when the API accepts connections (port 0 picks a free one). A restart
continues from the checkpoint in ``data_dir`` (learner/iteration.py, learner/checkpoint.py).

Under ``torchrun`` (``rlhf learn --nproc N`` starts it for one machine) the processes are ONE
learner (learner/cluster.py): rank 0 runs all of the above and the listening line names every
rank (``"ranks": [{"rank": 0, "pid": ...}, ...]``); the other ranks load the same base and
follow rank 0's iterations.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the client below must start fast: no torch/peft import behind config
    from learner.config import LearnerConfig

TOKEN_ENV = "RLHF_LEARN_ADMIN_TOKEN"  # the learner's own admin_token variable

log = logging.getLogger(__name__)


def _auto_trigger(runner, cfg: LearnerConfig, stop: threading.Event) -> None:
    while not stop.wait(cfg.auto_poll_s):
        try:
            started = runner.maybe_auto_trigger(cfg.auto_trigger_after)
        except Exception:  # Redis down: try again next poll
            log.exception("auto trigger check failed")
            continue
        if started is not None:
            log.info("auto-triggered iteration %s", started.id)


def torchrun_argv(nproc: int, argv: Sequence[str]) -> list[str]:
    """The command `rlhf learn --nproc N ...` becomes: torchrun on this machine, each rank
    running `rlhf learn` with the same flags."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "--",  # "--": torchrun parses no learner flag
            "rlhf.cli", "learn", *argv]


def run(cfg: LearnerConfig) -> int:
    import torch
    import uvicorn

    from learner import distributed as dd
    from learner.admin_api import Runner, create_app
    from learner.cluster import Cluster, die_with_parent
    from learner.iteration import Learner
    from rlhf.modeling import load_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = cfg.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        die_with_parent()
        wants_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
        joined = dd.init_from_env(timeout_s=cfg.dist_timeout_s, cuda=not wants_cpu)
        device = str(joined) if cfg.device in ("auto", "cuda") else device  # cuda:LOCAL_RANK
    cluster = Cluster(cfg.dist_heartbeat_s)
    loaded = load_model(cfg.model, device=device, dtype=cfg.dtype,
                        load_in_4bit=cfg.load_in_4bit)  # the one base model of this process
    learner = Learner(cfg, loaded, cluster=cluster)
    ranks = [{"rank": r, "pid": pid, "host": host} for r, (pid, host) in enumerate(
        dd.all_gather_object((os.getpid(), socket.gethostname())))]
    if not cluster.is_leader:
        try:
            cluster.follow(learner)
        finally:
            learner.close()
            dd.close()
        return 0
    runner = Runner(learner)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((cfg.host, cfg.port))
    server = uvicorn.Server(uvicorn.Config(create_app(runner, cfg.admin_token),
                                           log_level="warning"))
    stop = threading.Event()
    if cfg.auto_trigger_after > 0:
        threading.Thread(target=_auto_trigger, args=(runner, cfg, stop), daemon=True).start()
    sys.stdout.write(json.dumps({"event": "listening", "port": sock.getsockname()[1],
                                 "base_model": loaded.name, "resumed_from": learner.parent,
                                 "ppo_step": learner.ppo.step if learner.ppo else 0,
                                 "ranks": ranks}) + "\n")
    sys.stdout.flush()
    cluster.start_heartbeat()
    # uvicorn re-raises the SIGTERM/SIGINT it shut down on once it is done: held here until
    # the other ranks are released and the dataset closed, then raised (exit as signalled).
    caught: list[int] = []
    held = {sig: signal.signal(sig, lambda s, _frame: caught.append(s))
            for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        stop.set()
        runner.join(timeout=5.0)
        cluster.stop()
        learner.close()
        dd.close()
        for sig, handler in held.items():
            signal.signal(sig, handler)
    if caught:
        signal.raise_signal(caught[0])
    return 0


# -- `rlhf learner trigger|status|history|show ID` -------------------------------------------


def client_main(argv: Sequence[str]) -> int:
    import httpx

    parser = argparse.ArgumentParser(prog="rlhf learner",
                                     description="Talk to a running `rlhf learn` admin API.")
    parser.add_argument("action", choices=["trigger", "status", "history", "show"])
    parser.add_argument("id", nargs="?", help="iteration id (for show)")
    parser.add_argument("--url", default=os.environ.get("RLHF_LEARNER_URL",
                                                        "http://127.0.0.1:8100"),
                        help="admin API base URL (env RLHF_LEARNER_URL)")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV, ""),
                        help=f"bearer token (env {TOKEN_ENV})")
    args = parser.parse_args(list(argv))
    if args.action == "show" and not args.id:
        parser.error("show needs an iteration id")
    method, path = {"trigger": ("POST", "/v1/iterations"), "status": ("GET", "/v1/status"),
                    "history": ("GET", "/v1/iterations"),
                    "show": ("GET", f"/v1/iterations/{args.id}")}[args.action]
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    try:
        reply = httpx.request(method, args.url.rstrip("/") + path, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        sys.stderr.write(f"rlhf learner: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(reply.json(), indent=2, sort_keys=True) + "\n")
    return 0 if reply.is_success else 1
