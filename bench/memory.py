"""Learner memory bench: ``rlhf bench memory`` prints JSON.

The claim (docs/design.md §3): policy, reference, reward model and value function share ONE frozen
base in memory (LoRA adapters + small heads on top), so an iteration's peak stays a small
multiple of the base model's weight bytes; TRL's PPO holds four full models (policy,
reference, reward, value) plus a full optimizer state for the value model (trl#1833).

Measured on a real iteration (drain -> RM -> PPO -> evaluate -> publish -> record) of the
real ``Learner`` with a private redis-server and K = 4 comparisons of the starter tasks:
- ``base_weight_bytes`` W: parameters + buffers of the loaded base;
- ``persistent_extra_bytes``: what the learner adds and keeps (LoRA "rm" + "policy",
  RM head/bias, value head, Adam moments of the policy), counted tensor by tensor;
- ``peak_bytes``: on CUDA ``max_memory_allocated``; on CPU the process's peak resident set
  growth during the iteration (``VmHWM`` after resetting it through /proc/self/clear_refs)
  plus W. The CPU figure is an upper bound: it also counts Python objects, the allocator's
  cached pages and the tokenizer's work, not only tensors.
- ``four_model_floor_bytes``: 4 W + 2 W of Adam moments for a fully trained value model
  (TRL's layout, before any activation or gradient), for scale.
The first iteration includes one-off setup (the policy adapter and its optimizer); the
second is the steady state: both are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import redis
import torch

from bench.kit.records import gold_styles
from bench.kit.report import write_report
from learner.config import LearnerConfig
from learner.iteration import Learner, Progress
from rlhf import comparisons, settings
from rlhf.local_redis import private_redis
from rlhf.modeling import load_model, resolve_model_name

log = logging.getLogger(__name__)


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def live_tensor_bytes() -> int:
    """Bytes of every distinct CPU tensor storage the interpreter holds right now."""
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            with contextlib.suppress(RuntimeError):  # e.g. sparse/meta tensors: no storage
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _allocation_peaks(prof: torch.profiler.profile) -> tuple[int, dict[str, int]]:
    """Peak of the running sum of the allocator's (+) and free (-) events the profiler saw:
    the most tensor memory the block held above what was alive when it started; and the
    same peak reached inside each ``record_function`` phase (``phase:<name>``)."""
    events: list[tuple[int, int, str]] = []
    stack = [(node, "") for node in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        node, phase = stack.pop()
        if node.name.startswith("phase:"):
            phase = node.name.removeprefix("phase:")
        extra = node.extra_fields
        if type(extra).__name__ == "_ExtraFields_Allocation" and extra.device.type == "cpu":
            events.append((node.start_time_ns, extra.alloc_size, phase))
        stack.extend((child, phase) for child in node.children)
    running = peak = 0
    by_phase: dict[str, int] = {}
    for _, size, phase in sorted(events):
        running += size
        peak = max(peak, running)
        by_phase[phase] = max(by_phase.get(phase, 0), running)
    return peak, by_phase


def _annotate_phases(learner: Learner) -> None:
    """Wrap each phase method in a profiler range so peaks can be told apart by phase."""
    for name in ("drain", "reward_model", "train_policy", "evaluate", "publish", "record"):
        method = getattr(learner, name)

        def wrapped(*args, _method=method, _name=name):
            with torch.profiler.record_function(f"phase:{_name}"):
                return _method(*args)

        setattr(learner, name, wrapped)


class PeakMeter:
    """Peak tensor memory over a block: the CUDA allocator's peak, or on CPU the tensors
    alive at the start (weights, adapters, optimizer state) plus the peak of the profiler's
    allocation timeline; and the process's resident-set peak growth (an upper bound that
    also counts Python objects and the allocator's cached pages)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> PeakMeter:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
        self.rss_start = _status_kib("VmRSS") * 1024
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.start = live_tensor_bytes()
            self.prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.rss_growth = _status_kib("VmHWM") * 1024 - self.rss_start
        if self.cuda:
            torch.cuda.synchronize()
            self.peak, self.by_phase = torch.cuda.max_memory_allocated(), {}
            return
        self.prof.__exit__(*exc)
        growth, by_phase = _allocation_peaks(self.prof)
        self.peak = self.start + growth
        self.by_phase = {k: self.start + v for k, v in by_phase.items() if k}


def _persistent_extra(learner: Learner) -> int:
    tensors = [*learner.rm.trainable_parameters(), learner.rm.bias]
    if learner.ppo is not None:
        tensors += learner.ppo.trainable_parameters()
        for state in learner.ppo.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return _bytes(tensors)


def _overrides(pairs: list[str]) -> dict[str, str]:
    """``--set ppo_minibatch_size=4`` -> {"ppo_minibatch_size": "4"} (typed when built)."""
    return dict(pair.partition("=")[::2] for pair in pairs)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model = resolve_model_name(args.model)
    with private_redis("rlhf-membench-") as url, tempfile.TemporaryDirectory() as tmp:
        try:
            cfg = settings.from_flat(LearnerConfig, {
                **_overrides(args.set), "model": model, "device": args.device,
                "redis_url": url, "data_dir": f"{tmp}/data", "adapter_store": f"{tmp}/store",
                "threads": args.threads})
        except ValueError as exc:
            raise SystemExit(f"--set: {exc}") from None
        loaded = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        base = _bytes([*loaded.model.parameters(), *loaded.model.buffers()])
        client = redis.Redis.from_url(url)
        learner = Learner(cfg, loaded, client)
        _annotate_phases(learner)
        iterations = []
        try:
            for n in range(args.iterations):
                comparisons.append_many(client, gold_styles(args.comparisons, seed=n))
                start = time.perf_counter()
                with PeakMeter(learner.rm.device) as meter:
                    learner.run(Progress(id=f"mem-{n + 1}"))
                iterations.append({
                    "iteration": n + 1, "seconds": round(time.perf_counter() - start, 1),
                    "peak_tensor_bytes": meter.peak,
                    "peak_over_base": round(meter.peak / base, 2),
                    "peak_over_base_by_phase": {k: round(v / base, 2)
                                                for k, v in meter.by_phase.items()},
                    "process_rss_peak_growth_bytes": meter.rss_growth,
                    "persistent_extra_bytes": _persistent_extra(learner)})
        finally:
            learner.close()
    return {"model": loaded.name, "device": str(learner.rm.device), "threads": args.threads,
            "measure": "cuda max_memory_allocated" if learner.rm.device.type == "cuda"
            else "live CPU tensors at start + peak of the profiler's allocation timeline",
            "base_weight_bytes": base, "comparisons_per_iteration": args.comparisons,
            "config": {"rm_batch": cfg.rm.batch, "rm_micro_batch": cfg.rm.micro_batch,
                       "rm_max_length": cfg.rm.max_length,
                       "ppo_batch_size": cfg.ppo.batch_size,
                       "ppo_minibatch_size": cfg.ppo.minibatch_size,
                       "ppo_max_new_tokens": cfg.ppo.max_new_tokens},
            "iterations": iterations, "target_peak_over_base": 3.0,
            "four_model_floor_bytes": 6 * base, "four_model_floor_over_base": 6.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rlhf bench memory",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="a name of `rlhf models list`, a directory or "
                   "a hub id; default: the starter")
    p.add_argument("--device", default="cpu")
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--comparisons", type=int, default=64, help="new K=4 records per iteration")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a LearnerConfig field, e.g. --set rm_micro_batch=1")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    write_report(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
