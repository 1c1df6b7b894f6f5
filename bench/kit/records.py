"""Synthetic comparison records (``rlhf.v1.Comparison``) the benchmarks and harnesses train
on or submit: built in one place, deterministic for a seed."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

from rlhf import preferences
from rlhf.data import untied_pairs
from rlhf.gold import gold_tasks
from rlhf.preferences import Item
from rlhf.starter_data import ANSWER_STYLES, make_tasks, render_answer
from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import policy_pb2 as pb

EPOCH_MS = 1_700_000_000_000  # received_at of the first labelled record: runs repeat exactly
RUDE = ("Ugh, fine.", "Whatever.", "Stop bothering me.", "Figure it out yourself.")


def record(record_id: str, labeler: str, prompt: str, ranked: Sequence[tuple[str, int]],
           version: str = "base", seed: int = 0) -> fb.Comparison:
    """One user turn and its candidates ``(text, rank)`` in display order (position = index)."""
    out = fb.Comparison(id=record_id, labeler_id=labeler,
                        messages=[pb.ChatMessage(role="user", content=prompt)])
    for position, (text, rank) in enumerate(ranked):
        out.candidates.add(text=text, rank=rank, position=position, adapter_version=version,
                           seed=seed)
    return out


def label(items: Sequence[Item], samples: Sequence[Sequence[str]], iteration: int,
          labelers: int, seed: int, version: str, preference: preferences.Preference
          ) -> list[fb.Comparison]:
    """One Comparison per prompt, its samples ranked by ``preference``, from ``labelers``
    simulated labeler ids round robin, received at fixed times. Empty samples are left out
    (the Feedback API refuses empty candidates); a prompt with fewer than two left is
    skipped."""
    out = []
    for i, (item, texts) in enumerate(zip(items, samples, strict=True)):
        texts = [t for t in texts if t]
        if len(texts) < 2:
            continue
        ranks = preferences.ranks([preference.utility(item, t) for t in texts])
        out.append(record(f"sim-{seed}-{iteration:03d}-{i:05d}", f"sim-{i % labelers}",
                          item.prompt, list(zip(texts, ranks, strict=True)), version, seed))
        out[-1].received_at.FromMilliseconds(EPOCH_MS + 1000 * iteration + i)
    return out


def best_of_k_demonstrations(items: Sequence[Item], samples: Sequence[Sequence[str]],
                             labelers: int, seed: int, preference: preferences.Preference
                             ) -> list[fb.Demonstration]:
    """A simulated labeler's demonstration per prompt: of its K samples, the one its hidden
    ``preference`` rates highest (the first on a tie), from ``labelers`` ids round robin;
    a prompt whose samples are all empty gets none."""
    out = []
    for i, (item, texts) in enumerate(zip(items, samples, strict=True)):
        scored = [(preference.utility(item, t), -j, t) for j, t in enumerate(texts) if t.strip()]
        if not scored:
            continue
        best = max(scored)[2]
        demo = fb.Demonstration(id=f"simdemo-{seed}-{i:05d}", labeler_id=f"sim-{i % labelers}",
                                answer=best, source=fb.DEMONSTRATION_SOURCE_API,
                                messages=[pb.ChatMessage(role="user", content=item.prompt)])
        demo.received_at.FromMilliseconds(EPOCH_MS + i)
        out.append(demo)
    return out


def gold_styles(n: int, seed: int) -> list[fb.Comparison]:
    """K = 4 answers in the four styles to gold tasks, ranked by the gold preference."""
    rng = random.Random(seed)
    tasks = gold_tasks(n, seed)
    answers = [[render_answer(t, style, rng) for style in ANSWER_STYLES] for t in tasks]
    return label([Item(t.prompt, t) for t in tasks], answers, iteration=seed, labelers=5,
                 seed=seed, version="base", preference=preferences.get("gold"))


def synthetic_k4(n: int, seed: int) -> list[fb.Comparison]:
    """K = 4 per starter task: polite correct (1) > terse correct (2) > a plain answer to
    another task of the same kind (3, wrong) > that wrong answer with a rude opener (4)."""
    rng = random.Random(seed)
    tasks = make_tasks(2 * n, seed)
    out = []
    for i in range(n):
        task, other = tasks[2 * i], tasks[2 * i + 1]
        wrong = render_answer(other, "plain", rng)
        ranked = [(render_answer(task, "polite", rng), 1), (render_answer(task, "terse", rng), 2),
                  (wrong, 3), (f"{rng.choice(RUDE)} {wrong}", 4)]
        rng.shuffle(ranked)
        out.append(record(f"syn-{seed}-{i:06d}", f"sim-{i % 4}", task.prompt, ranked))
    return out


def tied_k4(n: int, seed: int) -> list[fb.Comparison]:
    """K = 4 with a tie (polite = plain > terse > verbose) from 3 labelers."""
    rng, out = random.Random(seed), []
    for i, task in enumerate(make_tasks(n, seed)):
        styles = [("polite", 1), ("plain", 1), ("terse", 3), ("verbose", 4)]
        rng.shuffle(styles)
        out.append(record(f"cmp-ddp-{i:05d}", f"labeler-{i % 3}", task.prompt,
                          [(render_answer(task, style, rng), r) for style, r in styles]))
    return out


def expand_pairs(comparisons: Sequence[fb.Comparison]) -> list[fb.Comparison]:
    """Every untied pair of every comparison as its own K = 2 comparison (the pairwise form)."""
    out = []
    for c in comparisons:
        for win, lose in untied_pairs(c):
            pair = fb.Comparison(id=f"{c.id}-{len(out):06d}", labeler_id=c.labeler_id,
                                 messages=c.messages)
            pair.candidates.add(text=win.text, rank=1, position=0)
            pair.candidates.add(text=lose.text, rank=2, position=1)
            out.append(pair)
    return out


def wire_comparison(k: int = 4) -> fb.Comparison:
    """A valid, realistically sized K-way record as a client submits it (set the id per
    request): what the Feedback load benchmark sends."""
    rec = fb.Comparison(labeler_id="bench", rank_time_ms=12_500, messages=[
        pb.ChatMessage(role="user", content="Explain in two sentences why the sky is blue.")])
    sampling = pb.SamplingParams(max_new_tokens=128, temperature=0.9, seed=7)
    for i in range(k):
        rec.candidates.add(text=f"Answer {i}: " + "Rayleigh scattering of sunlight. " * 8,
                           adapter_version="base", sampling=sampling, seed=7 + i,
                           position=(i + 1) % k, rank=1 + i // 2, request_id="bench-req")
    rec.created_at.FromMilliseconds(int(time.time() * 1000))
    return rec
