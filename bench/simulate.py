"""Simulated labelers (`rlhf simulate`): threads driving the UI's backend as the Gradio
handlers do.

Each labeler asks a question, streams the K alternatives through ``ServingClient.generate``,
ranks them, builds the record with ``ui.logic.build_comparison``, submits it through the
Feedback API and continues the chat from the top answer (a fresh conversation every
``TURNS_PER_CONVERSATION`` turns). The K answers are ranked by a hidden preference
(``rlhf.preferences``), so the learner has a real preference to learn: rehearsals, demos,
the efficacy of the loop:

- ``gold`` (default): questions are starter tasks with known answers and the answers are
  ranked correct > polite > concise (``rlhf.gold``);
- ``concise``, ``detailed``, ``polite``, ``enthusiastic``, ``length``: judge any text; the
  questions are the starter's tasks (``--prompts starter``) or everyday prompts for a real
  model (``--prompts general``, the default for these); ``length`` on fixed prompts is the
  feedback benchmark's load.

Labelers share a pacer: turns start at ``--rate`` comparisons/s in total (0 = as fast as
serving answers) until ``--seconds`` pass or ``--count`` comparisons are stored. Like the
ranking UI, they submit through serving's UI service token (``--auth-token`` or
``--token-file``; `rlhf up` writes ``DATA_DIR/ui-token``), each naming itself
(``sim-NN``); against a serving with no credentials configured no token is needed. Prints
one JSON document (per adapter version: candidates seen, their mean utility under the
preference and, on starter tasks, the share correct). ``rlhf bench feedback`` calls
``run`` in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.kit.stats import percentiles
from rlhf.gold import gold_tasks
from rlhf.preferences import EMPTY, PREFERENCES, Item, Preference, general_prompts, ranks
from rlhf.preferences import get as get_preference
from rlhf.starter_data import check
from rlhf.v1 import policy_pb2 as pb
from ui.client import ServingClient, ServingError
from ui.logic import Alternative, RankingError, Turn, build_comparison, continue_with, display_order

PROMPTS = ["What is 2 + 9?", "Put in order: 7 6 3 1", "Reverse the order: train rain",
           "Count the words: leaf grape", "Count the letters in moon.",
           "Write dog in capital letters.", "good morning", "What is 4 minus 0?"]
TURNS_PER_CONVERSATION = 2  # keeps prompts well inside a small model's context
ERROR_BACKOFF_S = 0.5  # a failing serving is not hammered in a tight loop
COUNT_LIMIT_S = 600.0  # with --count and no --seconds: give up after this long
DEFAULT_TOKEN_FILE = Path(".rlhf") / "ui-token"  # `rlhf up`'s default --data-dir


def questions(preference: str, prompts: str, rng: random.Random, seed: int
              ) -> Iterator[Item]:
    """Endless prompts: ``length`` asks the fixed PROMPTS; otherwise the starter's tasks
    (``prompts`` "starter", as gold needs) or the general everyday prompts."""
    if preference == "length" and prompts != "general":
        while True:
            yield Item(rng.choice(PROMPTS))
    if prompts == "general":
        pool = general_prompts()
        while True:
            yield Item(rng.choice(pool))
    while True:
        for task in gold_tasks(64, seed):
            yield Item(task.prompt, task)
        seed += 1


def ranker(preference: Preference, item: Item) -> Callable[[list[str]], list[int]]:
    return lambda texts: ranks([preference.utility(item, t) for t in texts])


class Pacer:
    """Shared by all labelers: hands out turn slots ``1/rate`` s apart (rate 0 = at once),
    none after the deadline, and none beyond ``count`` stored + in flight."""

    def __init__(self, rate: float, count: int | None, deadline: float) -> None:
        self.rate, self.count, self.deadline = rate, count, deadline
        self.next_slot, self.in_flight, self.stored = time.monotonic(), 0, 0
        self.lock = threading.Lock()

    def take(self, now: float) -> float | None:
        """The start time of the next turn (a slot not taken by then is not made up for
        later: no bursts), or None when the deadline or the count is reached."""
        with self.lock:
            if now >= self.deadline or (self.count is not None
                                        and self.stored + self.in_flight >= self.count):
                return None
            slot = max(now, self.next_slot)
            if slot >= self.deadline:
                return None
            self.next_slot = slot + (1.0 / self.rate if self.rate > 0 else 0.0)
            self.in_flight += 1
            return slot

    def claim(self) -> bool:
        """Wait for the next slot; False: stop."""
        slot = self.take(time.monotonic())
        if slot is None:
            return False
        time.sleep(max(0.0, slot - time.monotonic()))
        return True

    def release(self, stored: bool) -> None:
        with self.lock:
            self.in_flight -= 1
            self.stored += stored


@dataclass
class Tally:
    turns: int = 0
    stored: int = 0
    duplicates: int = 0
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    turn_s: list[float] = field(default_factory=list)
    versions: dict[str, dict[str, float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def error(self, text: str) -> None:
        with self.lock:
            self.errors += 1
            if text not in self.error_examples and len(self.error_examples) < 5:
                self.error_examples.append(text)

    def candidates(self, turn: Turn, item: Item, preference: Preference) -> None:
        """Per adapter version: candidates seen, their summed utility (empty answers count
        in ``empty``, not in the sum) and, on starter tasks, the correct ones."""
        with self.lock:
            for alt in turn.alternatives:
                row = self.versions.setdefault(alt.adapter_version or "?", {
                    "candidates": 0, "utility": 0.0, "empty": 0, "correct": 0})
                row["candidates"] += 1
                value = preference.utility(item, alt.text)
                if value == EMPTY:
                    row["empty"] += 1
                else:
                    row["utility"] += value
                if item.task is not None:
                    row["correct"] += check(item.task, alt.text.strip())


def one_turn(client: ServingClient, messages: list[dict[str, str]], labeler: str,
             args: argparse.Namespace, rng: random.Random,
             rank: Callable[[list[str]], list[int]]) -> tuple[Turn, list[int], bool]:
    """Generate, rank and submit one turn: (turn, ranks by position, duplicate)."""
    seed = rng.randrange(2**31)
    sampling = pb.SamplingParams(max_new_tokens=args.max_new_tokens, min_new_tokens=1,
                                 temperature=args.temperature, top_p=1.0, seed=seed)
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
    ranks = rank([a.text for a in turn.shown()])
    record = build_comparison(turn, comparison_id=uuid.uuid4().hex, labeler_id=labeler,
                              ranks=ranks, flags=[[] for _ in ranks], comment="",
                              ideal_answer="", rank_time_ms=rng.randrange(2000, 30000),
                              created_at_ms=int(time.time() * 1000))
    return turn, ranks, client.submit(record).duplicate


def labeler(n: int, args: argparse.Namespace, pacer: Pacer, tally: Tally) -> None:
    client = ServingClient(args.target, token(args), timeout_s=60.0)
    rng = random.Random(args.seed * 1000 + n)
    preference = get_preference(args.preference)
    asks = questions(args.preference, args.prompts, rng, args.seed * 1000 + n)
    history: list[dict[str, str]] = []
    try:
        while pacer.claim():
            item = next(asks)
            messages = [*history, {"role": "user", "content": item.prompt}]
            start = time.perf_counter()
            try:
                turn, ranks, duplicate = one_turn(client, messages, f"sim-{n:02d}", args, rng,
                                                  ranker(preference, item))
            except (ServingError, RankingError) as exc:
                pacer.release(False)
                tally.error(f"{type(exc).__name__}: {exc}"[:300])
                history = []
                time.sleep(ERROR_BACKOFF_S)
                continue
            pacer.release(not duplicate)
            tally.candidates(turn, item, preference)
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


def _by_version(tally: Tally, tasks: bool) -> dict[str, dict]:
    out = {}
    for version, row in sorted(tally.versions.items()):
        n, empty = int(row["candidates"]), int(row["empty"])
        out[version] = {"candidates": n, "empty": empty}
        if n > empty:
            out[version]["utility_mean"] = round(row["utility"] / (n - empty), 3)
        if tasks and n:
            out[version]["correct"] = round(row["correct"] / n, 3)
    return out


def run(args: argparse.Namespace) -> dict:
    tally = Tally()
    seconds = args.seconds if args.seconds is not None else (
        COUNT_LIMIT_S if args.count is not None else 15.0)
    start = time.monotonic()
    pacer = Pacer(args.rate, args.count, start + seconds)
    threads = [threading.Thread(target=labeler, args=(n, args, pacer, tally))
               for n in range(args.labelers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    return {"preference": args.preference, "prompts": args.prompts,
            "labelers": args.labelers, "k": args.k,
            "max_new_tokens": args.max_new_tokens, "rate": args.rate, "count": args.count,
            "wall_s": round(wall, 2), "turns": tally.turns, "stored": tally.stored,
            "duplicates": tally.duplicates, "errors": tally.errors,
            "error_examples": tally.error_examples,
            "turns_per_s": round(tally.turns / wall, 2),
            "comparisons_per_s": round(tally.stored / wall, 2),
            "turn_ms": percentiles(tally.turn_s, ("p50", "p95")),
            "adapter_versions": _by_version(tally, args.prompts == "starter")}


def token(args: argparse.Namespace) -> str:
    """--auth-token, else the first line of --token-file (what `rlhf up` writes), else none."""
    if args.auth_token:
        return args.auth_token
    path = Path(args.token_file) if args.token_file else DEFAULT_TOKEN_FILE
    if path.is_file():
        return path.read_text().strip()
    if args.token_file:
        raise SystemExit(f"--token-file {path}: no such file")
    return ""


def parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--target", default=os.environ.get("RLHF_UI_POLICY_TARGET",
                                                      "127.0.0.1:50051"),
                   help="gRPC address of `rlhf serve` (env RLHF_UI_POLICY_TARGET)")
    p.add_argument("--auth-token", default=os.environ.get("RLHF_UI_AUTH_TOKEN", ""),
                   help="serving's UI service token (its --ui-token): the simulated labelers "
                   "submit as themselves through it, like the ranking UI (env "
                   "RLHF_UI_AUTH_TOKEN)")
    p.add_argument("--token-file", default=os.environ.get("RLHF_SIMULATE_TOKEN_FILE", ""),
                   help="read that token from this file instead; default "
                   f"{DEFAULT_TOKEN_FILE} when it exists (written by `rlhf up`; env "
                   "RLHF_SIMULATE_TOKEN_FILE)")
    p.add_argument("--preference", choices=sorted(PREFERENCES), default="gold",
                   help="the hidden ranking rule: " + "; ".join(
                       f"{p.name}: {p.description}" for p in PREFERENCES.values()))
    p.add_argument("--prompts", choices=["auto", "starter", "general"], default="auto",
                   help="starter: the starter model's tasks; general: everyday prompts for a "
                   "real model; auto: starter for gold and length, else general")
    p.add_argument("--labelers", type=int, default=4, help="simulated labelers (threads)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="comparisons per second, all labelers together; 0 = as fast as possible")
    p.add_argument("--seconds", type=float, help="stop after this long (default 15, or "
                   f"{COUNT_LIMIT_S:.0f} as a limit with --count)")
    p.add_argument("--count", type=int, help="stop once this many comparisons are stored")
    p.add_argument("--k", type=int, default=4, help="alternatives per turn (2..9)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0, help="seed of questions and sampling")
    args = p.parse_args(argv)
    if args.labelers < 1 or not 2 <= args.k <= 9 or args.rate < 0:
        p.error("--labelers >= 1, --k in 2..9 and --rate >= 0 required")
    if (args.count is not None and args.count < 1) or (args.seconds is not None
                                                       and args.seconds <= 0):
        p.error("--count must be >= 1 and --seconds > 0")
    if args.prompts == "auto":
        args.prompts = "starter" if args.preference in ("gold", "length") else "general"
    if get_preference(args.preference).needs_tasks and args.prompts != "starter":
        p.error(f"--preference {args.preference} ranks starter tasks: use --prompts starter")
    return args


def main(argv: list[str] | None = None, prog: str = "python -m bench.simulate") -> int:
    """Run, print the JSON summary; exit 1 when not a single comparison was stored."""
    report = run(parse_args(argv, prog))
    sys.stdout.write(json.dumps(report) + "\n")
    return 0 if report["stored"] > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
