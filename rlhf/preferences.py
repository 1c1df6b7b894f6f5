"""Simulated labelers' preferences: hidden rules that rank K answers to one prompt.

``rlhf simulate`` and the learner's efficacy benchmark rank with these, so "the policy moved
toward what the labelers prefer" is measured against the same taste the rankings carried.
The learner never sees them: it only sees rankings. Each preference is a utility of one
answer (higher = preferred); ranks and win rates follow from it the same way for all:

- ranks: 1 + the number of strictly better answers (equal utilities tie);
- a pairwise win: 1 if a's utility is higher, 1/2 on a tie, else 0.

``gold`` needs the starter's tasks (it checks correctness); the others judge any text, so
they apply to every model and to the general prompts (``general_prompts``) as well. An empty
answer is the worst answer under every preference.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rlhf.gold import gold_score
from rlhf.starter_data import Task

EMPTY = -1000.0
"""Utility of an empty (or whitespace) answer under every preference."""

POLITE_WORDS: tuple[str, ...] = (
    "please", "thank", "happy to", "glad", "of course", "sure", "great question", "welcome",
    "my pleasure", "delighted", "kindly",
)
_WORD_RE = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Item:
    """One prompt a labeler ranks answers to; ``task`` when it is a starter task (gold)."""

    prompt: str
    task: Task | None = None


@dataclass(frozen=True)
class Preference:
    name: str
    description: str
    utility: Callable[[Item, str], float]
    needs_tasks: bool = False


def words(text: str) -> int:
    return len(_WORD_RE.findall(text))


def _guard(fn: Callable[[Item, str], float]) -> Callable[[Item, str], float]:
    return lambda item, text: fn(item, text.strip()) if text.strip() else EMPTY


def _gold(item: Item, text: str) -> float:
    if item.task is None:
        raise ValueError("the gold preference ranks starter tasks only (it checks answers)")
    return gold_score(item.task, text)


def _polite(_: Item, text: str) -> float:
    lowered = text.lower()
    return float(min(2, sum(w in lowered for w in POLITE_WORDS)))


def _enthusiastic(_: Item, text: str) -> float:
    return float(min(3, text.count("!")))


PREFERENCES: dict[str, Preference] = {p.name: p for p in (
    Preference("gold", "correct (+2) > polite (+1) > not rambling (-0.5); starter tasks only",
               _guard(_gold), needs_tasks=True),
    Preference("concise", "fewer words is better", _guard(lambda _, t: -float(words(t)))),
    Preference("detailed", "more words is better, up to 60", _guard(
        lambda _, t: float(min(60, words(t))))),
    Preference("length", "more characters is better (the feedback benchmark's load)",
               _guard(lambda _, t: float(len(t)))),
    Preference("polite", "more polite phrases (please, thank, glad, sure...) is better, up to 2",
               _guard(_polite)),
    Preference("enthusiastic", "more exclamation marks is better, up to 3",
               _guard(_enthusiastic)),
)}


def get(name: str) -> Preference:
    try:
        return PREFERENCES[name]
    except KeyError:
        raise ValueError(f"unknown preference {name!r}; known: {', '.join(PREFERENCES)}") \
            from None


def ranks(utilities: Sequence[float]) -> list[int]:
    """Comparison ranks (1 = best); equal utilities share a rank."""
    return [1 + sum(other > mine for other in utilities) for mine in utilities]


def win(a: float, b: float) -> float:
    """The per-prompt term of a win rate: 1, 1/2 on a tie, 0."""
    return 1.0 if a > b else 0.5 if a == b else 0.0


# -- prompts for models that are not the starter ----------------------------------------------

_TEMPLATES = (
    "What is {}?", "Tell me about {}.", "Give me one tip about {}.", "Why do people like {}?",
    "Explain {} to a child.", "Write one sentence about {}.", "What should I know about {}?",
    "Describe {} in a few words.", "How do I get started with {}?", "Is {} good for me?",
)
_SUBJECTS = (
    "gardening", "the moon", "coffee", "running", "chess", "rain", "bread", "music", "the ocean",
    "photosynthesis", "sleep", "cats", "dogs", "volcanoes", "reading", "bicycles", "tea",
    "the weather", "recycling", "painting", "swimming", "apples", "the internet", "trains",
    "birds", "mountains", "cooking pasta", "learning a language", "saving money", "stars",
    "friendship", "the history of maps", "honey bees", "snow", "libraries", "soup", "walking",
    "the color blue", "clocks", "rivers", "yoga", "writing letters", "camping", "rice",
    "electric cars", "museums", "the wind", "origami", "breakfast", "hiking",
)


def general_prompts() -> list[str]:
    """Every general prompt (templates x subjects), in a fixed order."""
    return [t.format(s) for s in _SUBJECTS for t in _TEMPLATES]


def is_heldout(prompt: str, fraction: float) -> bool:
    """A stable hash bucket (any process): held-out prompts are never ranked or trained on."""
    digest = hashlib.sha256(f"efficacy:{prompt}".encode()).hexdigest()
    return int(digest[:12], 16) / 16 ** 12 < fraction


def draw_general(n: int, seed: int, fraction: float, heldout: bool) -> list[Item]:
    """``n`` general prompts from the held-out (or training) bucket, drawn with replacement
    when the bucket is smaller than ``n`` (seeded)."""
    pool = [p for p in general_prompts() if is_heldout(p, fraction) == heldout]
    rng = random.Random(seed)
    picked = rng.sample(pool, n) if n <= len(pool) else [rng.choice(pool) for _ in range(n)]
    return [Item(p) for p in picked]
