"""Proof that it learns: simulated labelers with a hidden preference (``rlhf.preferences``:
gold, concise, detailed, polite, ...) rank the policy's OWN samples, the learner runs its real
iterations on them, and the policy is scored against the reference under that same
preference.

Per iteration, four named phases:

1. collect   K samples from the CURRENT policy (the base before the first iteration) for
             ``tasks_per_iteration`` training prompts (starter tasks or general prompts)
2. label     rank them by the preference -> ``rlhf.v1.Comparison`` records from
             ``labelers`` simulated labeler ids (so the RM's labeler-split held-out slice
             exists), XADDed into the comparisons stream as the Feedback service does
3. learn     ``Learner.run``: drain, RM, PPO, evaluate, publish, record (the path users run)
4. measure   win rate of policy vs reference (the base with adapters off) under the
             preference on HELD-OUT prompts, one sample each, same prompts; plus the
             iteration's RM held-out
             accuracy, RM reward, KL and held-out pretraining (ptx) loss

Iteration 0 is measured before any training: the policy IS the reference there, so its win
rate is ~0.5 up to sampling noise. Held-out tasks are those whose prompt falls in a hash
bucket (``heldout_prompt_fraction``); training tasks are drawn from the other prompts, so no
evaluation prompt is ever ranked, trained on or sampled by PPO.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from bench.kit.records import label
from learner.config import LearnerConfig
from learner.iteration import Learner, Progress
from learner.ppo import POLICY
from learner.samples import sample
from rlhf import comparisons, preferences
from rlhf.gold import POLITE_MARKERS, RAMBLING_MARKERS, gold_tasks
from rlhf.modeling import LoadedModel
from rlhf.preferences import Item, draw_general, is_heldout
from rlhf.settings import setting as _f
from rlhf.starter_data import check
from rlhf.v1.feedback_pb2 import Demonstration

log = logging.getLogger(__name__)

PROMPT_SETS = ("starter", "general")


@dataclass(frozen=True)
class EfficacyConfig:
    """The simulated-labeler loop around a learner (the learner's own knobs live in
    ``LearnerConfig``)."""

    iterations: int = _f(4, "learner iterations after iteration 0")
    tasks_per_iteration: int = _f(32, "prompts ranked per iteration")
    k: int = _f(4, "policy samples per prompt the simulated labeler ranks (2..9)")
    labelers: int = _f(8, "simulated labeler ids, round robin over comparisons")
    eval_tasks: int = _f(128, "held-out prompts of the win rate (one pair each)")
    heldout_prompt_fraction: float = _f(0.2, "share of the prompt space kept for evaluation")
    generate_batch: int = _f(64, "prompts per generate call")
    preference: str = _f("gold", "the simulated labelers' hidden preference "
                         "(rlhf.preferences: gold, concise, detailed, polite, ...)")
    prompts: str = _f("starter", "starter (the starter's tasks) or general (everyday prompts "
                      "for any model)")
    seed: int = _f(0, "seed of tasks and sampling")

    def __post_init__(self) -> None:
        if not 2 <= self.k <= 9 or self.labelers < 2 or self.iterations < 1:
            raise ValueError("k in 2..9, labelers >= 2 and iterations >= 1 required")
        if self.tasks_per_iteration < 1 or self.eval_tasks < 1 or self.generate_batch < 1:
            raise ValueError("tasks_per_iteration, eval_tasks and generate_batch must be >= 1")
        if not 0.0 < self.heldout_prompt_fraction < 1.0:
            raise ValueError("heldout_prompt_fraction must be in (0, 1)")
        if self.prompts not in PROMPT_SETS:
            raise ValueError(f"prompts must be one of {', '.join(PROMPT_SETS)}")
        if preferences.get(self.preference).needs_tasks and self.prompts != "starter":
            raise ValueError(f"the {self.preference} preference needs --prompts starter")


# -- prompts ---------------------------------------------------------------------------------


def draw_items(cfg: EfficacyConfig, n: int, seed: int, heldout: bool) -> list[Item]:
    """``n`` prompts whose prompt is (``heldout``) or is not in the evaluation bucket."""
    fraction = cfg.heldout_prompt_fraction
    if cfg.prompts == "general":
        return draw_general(n, seed, fraction, heldout)
    pool = gold_tasks(max(64, int(4 * n / min(fraction, 1 - fraction))), seed)
    tasks = [t for t in pool if is_heldout(t.prompt, fraction) == heldout][:n]
    if len(tasks) < n:
        raise ValueError(f"only {len(tasks)} of {n} tasks fall in the requested bucket")
    return [Item(t.prompt, t) for t in tasks]


# -- sampling --------------------------------------------------------------------------------


def generate(learner: Learner, prompts: Sequence[str], seed: int, policy: bool,
             batch: int = 64) -> list[str]:
    """One sample per prompt from the policy adapter (``policy``) or the reference (the base
    with every adapter off), both at the PPO sampling temperature / top-p and length cap."""
    texts = sample(learner.rm, learner.loaded.tokenizer, learner.ppo_cfg, prompts, seed,
                   POLICY if policy else None, batch)
    return [text.strip() for text in texts]


# -- measuring -------------------------------------------------------------------------------


def _has(text: str, markers: Sequence[str]) -> bool:
    lowered = text.lower()
    return any(m in lowered for m in markers)


def preference_eval(items: Sequence[Item], policy: Sequence[str], reference: Sequence[str],
                    preference: preferences.Preference) -> dict[str, float]:
    """Win rate of policy over reference under ``preference`` (ties count 1/2), the mean
    utilities (empty answers excluded from the mean, counted in ``empty``) and a few
    features of the policy's answers, over paired samples of the same prompts."""
    n = len(items)
    mine = [preference.utility(it, a) for it, a in zip(items, policy, strict=True)]
    theirs = [preference.utility(it, b) for it, b in zip(items, reference, strict=True)]

    def mean(values: Sequence[float]) -> float:
        kept = [v for v in values if v != preferences.EMPTY]
        return sum(kept) / len(kept) if kept else 0.0

    stats = {
        "win_rate": sum(map(preferences.win, mine, theirs)) / n,
        "score": mean(mine), "reference_score": mean(theirs),
        "words": sum(preferences.words(a) for a in policy) / n,
        "polite": sum(_has(a, POLITE_MARKERS) for a in policy) / n,
        "rambling": sum(_has(a, RAMBLING_MARKERS) for a in policy) / n,
        "empty": sum(not a for a in policy) / n,
    }
    if all(it.task is not None for it in items):
        stats["correct"] = sum(check(it.task, a) for it, a in zip(items, policy, strict=True)) / n
    return stats


def curve_point(iteration: int, stats: dict[str, float], metrics: dict, seconds: float
                ) -> dict:
    """One row of the curve: the preference measures + the learner's own metrics of the
    iteration (none at iteration 0, where nothing was trained)."""
    m = metrics.get
    return {"iteration": iteration, **{k: round(v, 4) for k, v in stats.items()},
            "rm_accuracy": m("rm/accuracy"), "rm_heldout_comparisons":
            m("rm/heldout_comparisons"), "reward": m("eval/policy_score"),
            "reward_reference": m("eval/reference_score"), "ppo_score": m("ppo/score"),
            "kl": m("eval/kl", 0.0), "ppo_kl": m("ppo/kl", 0.0),
            "ptx_loss": m("ptx/loss_after"), "ptx_loss_before": m("ptx/loss_before"),
            "sft_ran": m("sft/ran"), "comparisons": m("data/comparisons", 0),
            "seconds": round(seconds, 1)}


# -- the loop --------------------------------------------------------------------------------


def run_efficacy(cfg: EfficacyConfig, learner_cfg: LearnerConfig, loaded: LoadedModel,
                 on_point: Callable[[dict], None] | None = None,
                 demonstrations: Callable[[Learner], Sequence[Demonstration]] | None = None
                 ) -> list[dict]:
    """Iteration 0 (no training) and ``cfg.iterations`` learner iterations; returns the
    curve. ``learner_cfg.redis_url`` must point at an empty Redis database (its stream is
    the one the learner drains). ``demonstrations(learner)``, when given, is called after
    iteration 0 and what it returns goes into the stream beside iteration 1's comparisons
    (the Feedback service's path): iteration 1 runs its SFT phase on them first."""
    client = redis.Redis.from_url(learner_cfg.redis_url)
    learner = Learner(learner_cfg, loaded, client)
    preference = preferences.get(cfg.preference)
    held = draw_items(cfg, cfg.eval_tasks, cfg.seed + 1, True)
    held_prompts = [t.prompt for t in held]

    def gen(prompts: Sequence[str], seed: int, policy: bool) -> list[str]:
        return generate(learner, prompts, seed, policy, cfg.generate_batch)

    # The reference never changes, so its samples are drawn once; the policy samples with the
    # same seed every time (common random numbers: only the policy's change moves the rate).
    reference = gen(held_prompts, cfg.seed + 2, False)
    curve: list[dict] = []
    try:
        start = time.perf_counter()
        curve.append(curve_point(0, preference_eval(
            held, gen(held_prompts, cfg.seed + 3, False), reference, preference), {},
            time.perf_counter() - start))
        if on_point:
            on_point(curve[-1])
        for it in range(1, cfg.iterations + 1):
            start, trained = time.perf_counter(), learner.ppo is not None
            tasks = draw_items(cfg, cfg.tasks_per_iteration, cfg.seed + 100 + it,
                               False)  # 1. collect
            flat = gen([t.prompt for t in tasks for _ in range(cfg.k)], cfg.seed + 1000 + it,
                       trained)
            samples = [flat[i * cfg.k:(i + 1) * cfg.k] for i in range(len(tasks))]
            version = learner.parent or "base"
            records = label(tasks, samples, it, cfg.labelers, cfg.seed, version,
                            preference)  # 2. label
            if it == 1 and demonstrations is not None:
                comparisons.append_many(client, demonstrations(learner))
            comparisons.append_many(client, records)
            progress = learner.run(Progress(id=learner.new_id()))  # 3. learn
            if it == 1 and not progress.metrics.get("sft/ran"):
                # the policy LoRA starts at zero: its "before" loss is the base's (after an
                # SFT phase it is the SFT policy's, so iteration 0 keeps None)
                curve[0]["ptx_loss"] = progress.metrics["ptx/loss_before"]
            stats = preference_eval(held, gen(held_prompts, cfg.seed + 3, True), reference,
                                    preference)  # 4. measure
            curve.append(curve_point(it, stats, progress.metrics, time.perf_counter() - start))
            curve[-1]["labelled"] = len(records)
            if on_point:
                on_point(curve[-1])
    finally:
        learner.close()
    return curve
