"""Simulated labelers: threads driving the UI's backend exactly as the Gradio handlers do.

Each labeler sends a message, streams the K alternatives through ``ServingClient.generate``,
ranks them by a fixed rule (longer answer = better, equal lengths tie), builds the record
with ``ui.logic.build_comparison``, submits it, and continues the chat from the top answer
(a fresh conversation every few turns). Run as a process, like the UI:

    python -m ui.simulate --target 127.0.0.1:50051 --labelers 16 --seconds 15

and prints one JSON document. ``rlhf bench feedback`` uses it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

from rlhf.v1 import policy_pb2 as pb
from ui.client import ServingClient, ServingError
from ui.logic import Alternative, RankingError, Turn, build_comparison, continue_with, display_order

PROMPTS = ["What is 2 + 9?", "Put in order: 7 6 3 1", "Reverse the order: train rain",
           "Count the words: leaf grape", "Count the letters in moon.",
           "Write dog in capital letters.", "good morning", "What is 4 minus 0?"]
TURNS_PER_CONVERSATION = 2  # keeps prompts well inside a small model's context


def rank_by_length(texts: list[str]) -> list[int]:
    """1 + the number of strictly longer texts: longest = 1, equal lengths tie."""
    return [1 + sum(len(o) > len(t) for o in texts) for t in texts]


@dataclass
class Tally:
    turns: int = 0
    stored: int = 0
    duplicates: int = 0
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    turn_s: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def error(self, text: str) -> None:
        with self.lock:
            self.errors += 1
            if text not in self.error_examples and len(self.error_examples) < 5:
                self.error_examples.append(text)


def one_turn(client: ServingClient, messages: list[dict[str, str]], labeler: str,
             args: argparse.Namespace, rng: random.Random) -> tuple[Turn, list[int], bool]:
    """Generate, rank and submit one turn: (turn, ranks by position, duplicate)."""
    seed = rng.randrange(2**31)
    sampling = pb.SamplingParams(max_new_tokens=args.max_new_tokens, min_new_tokens=1,
                                 temperature=0.9, top_p=1.0, seed=seed)
    turn = Turn(messages=messages, request_id=uuid.uuid4().hex, sampling=sampling,
                order=display_order(args.k, seed),
                alternatives=[Alternative(index=i) for i in range(args.k)])
    for delta in client.generate(messages, args.k, sampling, turn.request_id):
        alt = turn.alternatives[delta.index]
        alt.text += delta.text
        alt.adapter_version, alt.seed = delta.adapter_version, delta.seed
        alt.done = alt.done or delta.done
    for alt in turn.alternatives:  # as the UI does: a clean end finished every index
        alt.done = True
    turn.finished_at = time.monotonic()
    ranks = rank_by_length([a.text for a in turn.shown()])
    record = build_comparison(turn, comparison_id=uuid.uuid4().hex, labeler_id=labeler,
                              ranks=ranks, flags=[[] for _ in ranks], comment="",
                              ideal_answer="", rank_time_ms=rng.randrange(2000, 30000),
                              created_at_ms=int(time.time() * 1000))
    return turn, ranks, client.submit(record).duplicate


def labeler(n: int, args: argparse.Namespace, deadline: float, tally: Tally) -> None:
    client, rng = ServingClient(args.target, timeout_s=60.0), random.Random(n)
    history: list[dict[str, str]] = []
    try:
        while time.monotonic() < deadline:
            messages = [*history, {"role": "user", "content": rng.choice(PROMPTS)}]
            start = time.perf_counter()
            try:
                turn, ranks, duplicate = one_turn(client, messages, f"sim-{n:02d}", args, rng)
            except (ServingError, RankingError) as exc:
                tally.error(f"{type(exc).__name__}: {exc}"[:300])
                history = []
                continue
            with tally.lock:
                tally.turns += 1
                tally.stored += not duplicate
                tally.duplicates += duplicate
                tally.turn_s.append(time.perf_counter() - start)
            history = continue_with(turn, ranks)
            if len(history) >= 2 * TURNS_PER_CONVERSATION:
                history = []
    finally:
        client.close()


def _pct(values: list[float], q: float) -> float | None:
    v = sorted(values)
    return round(1000 * v[min(len(v) - 1, int(q * len(v)))], 1) if v else None


def run(args: argparse.Namespace) -> dict:
    tally = Tally()
    start = time.monotonic()
    deadline = start + args.seconds
    threads = [threading.Thread(target=labeler, args=(n, args, deadline, tally))
               for n in range(args.labelers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    return {"labelers": args.labelers, "k": args.k, "max_new_tokens": args.max_new_tokens,
            "wall_s": round(wall, 2), "turns": tally.turns, "stored": tally.stored,
            "duplicates": tally.duplicates, "errors": tally.errors,
            "error_examples": tally.error_examples,
            "turns_per_s": round(tally.turns / wall, 2),
            "turn_ms": {"p50": _pct(tally.turn_s, 0.5), "p95": _pct(tally.turn_s, 0.95)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ui.simulate", description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="gRPC address of `rlhf serve`")
    p.add_argument("--labelers", type=int, default=16)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    sys.stdout.write(json.dumps(run(args)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
