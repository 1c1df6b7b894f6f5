"""Proof that it learns (issue #4): simulated labelers with the hidden gold preference
(``rlhf.gold``) rank the policy's OWN samples, the learner runs its real iterations on them,
and the policy is scored against the reference under that same gold preference.

Per iteration, four named phases:

1. collect   K samples from the CURRENT policy (the base before the first iteration) for
             ``tasks_per_iteration`` training tasks
2. label     rank them with ``gold_ranks`` -> ``rlhf.v1.Comparison`` records from
             ``labelers`` simulated labeler ids (so the RM's labeler-split held-out slice
             exists), XADDed into the comparisons stream as the Feedback service does
3. learn     ``Learner.run``: drain, RM, PPO, evaluate, publish, record (the path users run)
4. measure   gold win rate of policy vs reference (the base with adapters off) on HELD-OUT
             tasks, one sample each per task, same prompts; plus the iteration's RM held-out
             accuracy, RM reward, KL and held-out pretraining (ptx) loss

Iteration 0 is measured before any training: the policy IS the reference there, so its win
rate is ~0.5 up to sampling noise. Held-out tasks are those whose prompt falls in a hash
bucket (``heldout_prompt_fraction``); training tasks are drawn from the other prompts, so no
evaluation prompt is ever ranked, trained on or sampled by PPO.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from learner.config import LearnerConfig
from learner.iteration import Learner, Progress
from learner.ppo import POLICY
from learner.samples import sample
from rlhf import comparisons
from rlhf.gold import (
    POLITE_MARKERS,
    RAMBLING_MARKERS,
    gold_prefers,
    gold_ranks,
    gold_score,
    gold_tasks,
)
from rlhf.modeling import LoadedModel
from rlhf.settings import setting as _f
from rlhf.starter_data import Task, check
from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import policy_pb2 as pb

log = logging.getLogger(__name__)

EPOCH_MS = 1_700_000_000_000  # received_at of the first record: fixed, so runs repeat exactly


@dataclass(frozen=True)
class EfficacyConfig:
    """The simulated-labeler loop around a learner (the learner's own knobs live in
    ``LearnerConfig``)."""

    iterations: int = _f(4, "learner iterations after iteration 0")
    tasks_per_iteration: int = _f(32, "gold tasks ranked per iteration")
    k: int = _f(4, "policy samples per task the simulated labeler ranks (2..9)")
    labelers: int = _f(8, "simulated labeler ids, round robin over comparisons")
    eval_tasks: int = _f(128, "held-out tasks of the gold win rate (one pair each)")
    heldout_prompt_fraction: float = _f(0.2, "share of the prompt space kept for evaluation")
    generate_batch: int = _f(64, "prompts per generate call")
    seed: int = _f(0, "seed of tasks and sampling")

    def __post_init__(self) -> None:
        if not 2 <= self.k <= 9 or self.labelers < 2 or self.iterations < 1:
            raise ValueError("k in 2..9, labelers >= 2 and iterations >= 1 required")
        if self.tasks_per_iteration < 1 or self.eval_tasks < 1 or self.generate_batch < 1:
            raise ValueError("tasks_per_iteration, eval_tasks and generate_batch must be >= 1")
        if not 0.0 < self.heldout_prompt_fraction < 1.0:
            raise ValueError("heldout_prompt_fraction must be in (0, 1)")


# -- tasks -----------------------------------------------------------------------------------


def is_heldout(prompt: str, fraction: float) -> bool:
    """Whether ``prompt`` is reserved for evaluation (a stable hash bucket, any process)."""
    digest = hashlib.sha256(f"efficacy:{prompt}".encode()).hexdigest()
    return int(digest[:12], 16) / 16 ** 12 < fraction


def draw_tasks(n: int, seed: int, fraction: float, heldout: bool) -> list[Task]:
    """``n`` gold tasks whose prompts are (``heldout``) or are not in the evaluation bucket."""
    pool = gold_tasks(max(64, int(4 * n / min(fraction, 1 - fraction))), seed)
    tasks = [t for t in pool if is_heldout(t.prompt, fraction) == heldout][:n]
    if len(tasks) < n:
        raise ValueError(f"only {len(tasks)} of {n} tasks fall in the requested bucket")
    return tasks


# -- sampling --------------------------------------------------------------------------------


def generate(learner: Learner, prompts: Sequence[str], seed: int, policy: bool,
             batch: int = 64) -> list[str]:
    """One sample per prompt from the policy adapter (``policy``) or the reference (the base
    with every adapter off), both at the PPO sampling temperature / top-p and length cap."""
    texts = sample(learner.rm, learner.loaded.tokenizer, learner.ppo_cfg, prompts, seed,
                   POLICY if policy else None, batch)
    return [text.strip() for text in texts]


# -- labelling -------------------------------------------------------------------------------


def label(tasks: Sequence[Task], samples: Sequence[Sequence[str]], iteration: int,
          labelers: int, seed: int, version: str) -> list[fb.Comparison]:
    """One Comparison per task, its samples ranked by the gold preference. Empty samples
    are left out (the Feedback API refuses empty candidates); a task with fewer than two
    left is skipped."""
    out = []
    for i, (task, texts) in enumerate(zip(tasks, samples, strict=True)):
        texts = [t for t in texts if t]
        if len(texts) < 2:
            continue
        record = fb.Comparison(id=f"gold-{seed}-{iteration:03d}-{i:05d}",
                               labeler_id=f"sim-{i % labelers}",
                               messages=[pb.ChatMessage(role="user", content=task.prompt)])
        for position, (text, rank) in enumerate(zip(texts, gold_ranks(task, texts),
                                                    strict=True)):
            record.candidates.add(text=text, rank=rank, position=position,
                                  adapter_version=version, seed=seed)
        record.received_at.FromMilliseconds(EPOCH_MS + 1000 * iteration + i)
        out.append(record)
    return out


# -- measuring -------------------------------------------------------------------------------


def _has(text: str, markers: Sequence[str]) -> bool:
    lowered = text.lower()
    return any(m in lowered for m in markers)


def gold_eval(tasks: Sequence[Task], policy: Sequence[str], reference: Sequence[str]
              ) -> dict[str, float]:
    """Gold win rate of policy over reference (ties count 1/2) and what makes up the policy's
    gold score, over paired samples of the same tasks."""
    n = len(tasks)
    triples = list(zip(tasks, policy, reference, strict=True))
    return {
        "gold_win_rate": sum(gold_prefers(t, a, b) for t, a, b in triples) / n,
        "gold_score": sum(gold_score(t, a) for t, a, _ in triples) / n,
        "reference_gold_score": sum(gold_score(t, b) for t, _, b in triples) / n,
        "correct": sum(check(t, a) for t, a, _ in triples) / n,
        "polite": sum(_has(a, POLITE_MARKERS) for a in policy) / n,
        "rambling": sum(_has(a, RAMBLING_MARKERS) for a in policy) / n,
        "empty": sum(not a for a in policy) / n,
    }


def curve_point(iteration: int, gold: dict[str, float], metrics: dict, seconds: float
                ) -> dict:
    """One row of the curve: the gold measures + the learner's own metrics of the iteration
    (none at iteration 0, where nothing was trained)."""
    m = metrics.get
    return {"iteration": iteration, **{k: round(v, 4) for k, v in gold.items()},
            "rm_accuracy": m("rm/accuracy"), "rm_heldout_comparisons":
            m("rm/heldout_comparisons"), "reward": m("eval/policy_score"),
            "reward_reference": m("eval/reference_score"), "ppo_score": m("ppo/score"),
            "kl": m("eval/kl", 0.0), "ppo_kl": m("ppo/kl", 0.0),
            "ptx_loss": m("ptx/loss_after"), "comparisons": m("data/comparisons", 0),
            "seconds": round(seconds, 1)}


# -- the loop --------------------------------------------------------------------------------


def run_efficacy(cfg: EfficacyConfig, learner_cfg: LearnerConfig, loaded: LoadedModel,
                 on_point: Callable[[dict], None] | None = None) -> list[dict]:
    """Iteration 0 (no training) and ``cfg.iterations`` learner iterations; returns the
    curve. ``learner_cfg.redis_url`` must point at an empty Redis database (its stream is
    the one the learner drains)."""
    client = redis.Redis.from_url(learner_cfg.redis_url)
    learner = Learner(learner_cfg, loaded, client)
    held = draw_tasks(cfg.eval_tasks, cfg.seed + 1, cfg.heldout_prompt_fraction, True)
    held_prompts = [t.prompt for t in held]

    def gen(prompts: Sequence[str], seed: int, policy: bool) -> list[str]:
        return generate(learner, prompts, seed, policy, cfg.generate_batch)

    # The reference never changes, so its samples are drawn once; the policy samples with the
    # same seed every time (common random numbers: only the policy's change moves the rate).
    reference = gen(held_prompts, cfg.seed + 2, False)
    curve: list[dict] = []
    try:
        start = time.perf_counter()
        curve.append(curve_point(0, gold_eval(held, gen(held_prompts, cfg.seed + 3, False),
                                              reference), {}, time.perf_counter() - start))
        if on_point:
            on_point(curve[-1])
        for it in range(1, cfg.iterations + 1):
            start, trained = time.perf_counter(), learner.ppo is not None
            tasks = draw_tasks(cfg.tasks_per_iteration, cfg.seed + 100 + it,
                               cfg.heldout_prompt_fraction, False)  # 1. collect
            flat = gen([t.prompt for t in tasks for _ in range(cfg.k)], cfg.seed + 1000 + it,
                       trained)
            samples = [flat[i * cfg.k:(i + 1) * cfg.k] for i in range(len(tasks))]
            version = learner.parent or "base"
            records = label(tasks, samples, it, cfg.labelers, cfg.seed, version)  # 2. label
            comparisons.append_many(client, records)
            progress = learner.run(Progress(id=learner.new_id()))  # 3. learn
            if it == 1:  # the policy LoRA starts at zero: its "before" loss is the base's
                curve[0]["ptx_loss"] = progress.metrics["ptx/loss_before"]
            gold = gold_eval(held, gen(held_prompts, cfg.seed + 3, True), reference)  # 4.
            curve.append(curve_point(it, gold, progress.metrics, time.perf_counter() - start))
            curve[-1]["labelled"] = len(records)
            if on_point:
                on_point(curve[-1])
    finally:
        learner.close()
    return curve
