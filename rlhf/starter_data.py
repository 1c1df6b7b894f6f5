"""Deterministic synthetic chat tasks for the starter model.

The project builds its own tiny chat model offline, so the training data is generated here
from a seed instead of being downloaded. Every task has a checkable answer (so held-out
accuracy and simulated labelers are possible) and every answer can be rendered in several
STYLES, so sampled alternatives differ visibly and RLHF has a preference to shift.
Only ``random.Random(seed)`` instances are used: the global RNG is never touched.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DATA_VERSION = "starter-data-v2"
"""Bump whenever generated data changes, so cached starter models are rebuilt."""

ANSWER_STYLES: tuple[str, ...] = ("terse", "plain", "polite", "verbose")
"""Terse = bare answer, plain = sentence, polite = friendly prefix, verbose = rambling."""

STYLE_WEIGHTS: tuple[float, ...] = (0.3, 0.3, 0.25, 0.15)
"""Training mix of ``ANSWER_STYLES``: verbose is rarer because its tokens teach little."""

KINDS: tuple[str, ...] = (
    "add", "sub", "sort", "reverse", "count_words", "count_letters", "upper", "chat",
)

MAX_NUMBER = 10
"""Operands stay small so a few-million-parameter model can learn them in minutes."""

MAX_SORT_NUMBER = 9
"""Sorting uses single digits: comparing digit tokens is learnable at this model size."""

WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "tree", "fish", "bird", "moon", "star", "apple", "lemon", "river",
    "cloud", "stone", "house", "book", "chair", "table", "grape", "tiger", "horse", "mouse",
    "bread", "water", "plant", "train", "boat", "snow", "rain", "leaf", "milk", "frog", "duck",
)
"""Content words; disjoint from all template words so ``check`` can filter on them."""

SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a tiny assistant. Answer simple questions.",
    "Be helpful and friendly.",
)

_POLITE_PREFIXES = ("Sure!", "Of course!", "Happy to help!", "Great question!")
_VERBOSE_OPENERS = (
    "Let me think about that.", "Hmm, let me work it out.", "Okay, let me see.",
)
_VERBOSE_CLOSERS = (
    "I hope this helps, let me know if you need anything else!",
    "Let me know if you have any other questions!",
    "Feel free to ask me more, I am always glad to help.",
)


@dataclass(frozen=True)
class Task:
    """One chat task: ``answer`` is the canonical terse answer, ``statement`` a full sentence."""

    prompt: str
    answer: str
    kind: str
    statement: str = ""


@dataclass(frozen=True)
class _Topic:
    """A small-talk topic: fixed replies per style and words that make a reply acceptable."""

    prompts: tuple[str, ...]
    replies: dict[str, tuple[str, ...]]
    keywords: tuple[str, ...]


_TOPICS: tuple[_Topic, ...] = (
    _Topic(("hi", "hello", "hey", "Hi there!", "good morning"), {
        "terse": ("Hello!", "Hi!"),
        "plain": ("Hello! How can I help you today?",),
        "polite": ("Hello, it is nice to meet you! How can I help you today?",),
    }, ("hello", "hi")),
    _Topic(("how are you?", "How are you doing?", "how is it going?"), {
        "terse": ("Fine, thanks!",),
        "plain": ("I am doing well, thank you.",),
        "polite": ("I am doing well, thank you for asking! How are you?",),
    }, ("fine", "well")),
    _Topic(("what can you do?", "What can you help with?", "what are you good at?"), {
        "terse": ("Simple math and word puzzles.",),
        "plain": ("I can add and subtract numbers, sort numbers, and play with words.",),
        "polite": ("Glad you asked! I can do small sums, sort numbers, and play with words.",),
    }, ("math", "numbers", "words", "sums")),
    _Topic(("who are you?", "what is your name?"), {
        "terse": ("A tiny assistant.",),
        "plain": ("I am a tiny assistant model for simple tasks.",),
        "polite": ("Nice to meet you! I am a tiny assistant model for simple tasks.",),
    }, ("assistant",)),
    _Topic(("thanks", "thank you!", "thanks a lot"), {
        "terse": ("You're welcome!",),
        "plain": ("You are welcome.",),
        "polite": ("You are very welcome, it was my pleasure!",),
    }, ("welcome", "pleasure")),
    _Topic(("bye", "goodbye", "see you later"), {
        "terse": ("Bye!",),
        "plain": ("Goodbye, have a nice day!",),
        "polite": ("Goodbye! It was lovely talking to you, have a nice day!",),
    }, ("bye", "goodbye")),
)
_TOPIC_BY_PROMPT = {p: topic for topic in _TOPICS for p in topic.prompts}


def _make_add(rng: random.Random) -> Task:
    a, b = rng.randint(0, MAX_NUMBER), rng.randint(0, MAX_NUMBER)
    form = rng.choice(("What is {a} + {b}?", "{a} + {b} = ?", "Add {a} and {b}.",
                       "What is {a} plus {b}?"))
    return Task(form.format(a=a, b=b), str(a + b), "add", f"{a} + {b} = {a + b}.")


def _make_sub(rng: random.Random) -> Task:
    a = rng.randint(0, MAX_NUMBER)
    b = rng.randint(0, a)
    form = rng.choice(("What is {a} - {b}?", "{a} - {b} = ?", "Subtract {b} from {a}.",
                       "What is {a} minus {b}?"))
    return Task(form.format(a=a, b=b), str(a - b), "sub", f"{a} - {b} = {a - b}.")


def _make_sort(rng: random.Random) -> Task:
    nums = [rng.randint(0, MAX_SORT_NUMBER) for _ in range(rng.randint(3, 4))]
    form = rng.choice(("Sort these numbers: {x}", "Put in order: {x}",
                       "Sort from smallest to largest: {x}"))
    out = " ".join(map(str, sorted(nums)))
    return Task(form.format(x=" ".join(map(str, nums))), out, "sort",
                "In order: " + ", ".join(map(str, sorted(nums))) + ".")


def _make_reverse(rng: random.Random) -> Task:
    words = rng.sample(WORDS, rng.randint(2, 4))
    form = rng.choice(("Reverse these words: {x}", "Say these words backwards: {x}",
                       "Reverse the order: {x}"))
    out = " ".join(reversed(words))
    return Task(form.format(x=" ".join(words)), out, "reverse", f"Reversed: {out}.")


def _make_count_words(rng: random.Random) -> Task:
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
    form = rng.choice(("Count the words: {x}", "How many words are in: {x}?"))
    n = len(words)
    return Task(form.format(x=" ".join(words)), str(n), "count_words", f"There are {n} words.")


def _make_count_letters(rng: random.Random) -> Task:
    word = rng.choice(WORDS)
    form = rng.choice(("How many letters are in the word {w}?", "Count the letters in {w}."))
    n = len(word)
    return Task(form.format(w=word), str(n), "count_letters", f"The word {word} has {n} letters.")


def _make_upper(rng: random.Random) -> Task:
    word = rng.choice(WORDS)
    form = rng.choice(("Write {w} in capital letters.", "Uppercase the word {w}.",
                       "Make {w} upper case."))
    return Task(form.format(w=word), word.upper(), "upper", f"In capitals: {word.upper()}.")


def _make_chat(rng: random.Random) -> Task:
    topic = rng.choice(_TOPICS)
    return Task(rng.choice(topic.prompts), topic.replies["terse"][0], "chat",
                topic.replies["plain"][0])


_MAKERS: dict[str, Callable[[random.Random], Task]] = {
    "add": _make_add, "sub": _make_sub, "sort": _make_sort, "reverse": _make_reverse,
    "count_words": _make_count_words, "count_letters": _make_count_letters,
    "upper": _make_upper, "chat": _make_chat,
}


def make_tasks(n: int, seed: int, kinds: Sequence[str] | None = None) -> list[Task]:
    """Return ``n`` tasks cycling through ``kinds`` (balanced, so per-kind accuracy is fair)."""
    kinds = tuple(kinds or KINDS)
    unknown = set(kinds) - set(_MAKERS)
    if unknown:
        raise ValueError(f"unknown task kinds: {sorted(unknown)}")
    rng = random.Random(seed)
    return [_MAKERS[kinds[i % len(kinds)]](rng) for i in range(n)]


def render_answer(task: Task, style: str, rng: random.Random) -> str:
    """Render the correct answer in ``style``; the same task gets visibly different texts."""
    if style not in ANSWER_STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {ANSWER_STYLES}")
    if task.kind == "chat":
        replies = _TOPIC_BY_PROMPT[task.prompt].replies
        if style == "verbose":
            return f"{rng.choice(replies['plain'])} {rng.choice(_VERBOSE_CLOSERS)}"
        return rng.choice(replies[style])
    if style == "terse":
        return task.answer
    if style == "plain":
        return task.statement
    if style == "polite":
        return f"{rng.choice(_POLITE_PREFIXES)} {task.statement}"
    return f"{rng.choice(_VERBOSE_OPENERS)} {task.statement} {rng.choice(_VERBOSE_CLOSERS)}"


_INT_RE = re.compile(r"-?\d+")
_WORD_RE = re.compile(r"[A-Za-z']+")


def _ints(text: str) -> list[int]:
    return [int(x) for x in _INT_RE.findall(text)]


def _check_numbers(task: Task, output: str) -> bool:
    """The last ``k`` integers in the output must be the answer (openers hold no numbers)."""
    expected = _ints(task.answer)
    found = _ints(output)
    return len(found) >= len(expected) and found[len(found) - len(expected):] == expected


def _check_reverse(task: Task, output: str) -> bool:
    """Keep only the task's own content words; what remains must be the reversed list."""
    vocab = set(task.answer.split())
    kept = [w for w in _WORD_RE.findall(output.lower()) if w in vocab]
    return kept == task.answer.split()


def _check_upper(task: Task, output: str) -> bool:
    """All all-caps words (length >= 2) must be the expected word, and there must be one."""
    caps = [w for w in _WORD_RE.findall(output) if len(w) >= 2 and w.isupper()]
    return bool(caps) and all(w == task.answer for w in caps)


def _check_chat(task: Task, output: str) -> bool:
    """Small talk is open-ended: accept any reply that mentions one of the topic keywords."""
    topic = _TOPIC_BY_PROMPT.get(task.prompt)
    words = set(_WORD_RE.findall(output.lower()))
    return topic is not None and any(k in words for k in topic.keywords)


_CHECKERS: dict[str, Callable[[Task, str], bool]] = {
    "add": _check_numbers, "sub": _check_numbers, "sort": _check_numbers,
    "count_words": _check_numbers, "count_letters": _check_numbers,
    "reverse": _check_reverse, "upper": _check_upper, "chat": _check_chat,
}


def check(task: Task, model_output: str) -> bool:
    """Return True if ``model_output`` answers ``task`` correctly, whatever its style."""
    return _CHECKERS[task.kind](task, model_output.strip())


def make_conversation(rng: random.Random, tasks: Sequence[Task]) -> list[dict[str, str]]:
    """Chat messages for ``tasks`` as consecutive turns, each answer in a random style.

    A random system prompt is added sometimes so the model tolerates one at inference.
    """
    messages: list[dict[str, str]] = []
    if rng.random() < 0.1:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for task in tasks:
        answer = render_answer(task, rng.choices(ANSWER_STYLES, STYLE_WEIGHTS)[0], rng)
        messages += [{"role": "user", "content": task.prompt},
                     {"role": "assistant", "content": answer}]
    return messages


def _plain_sentence(rng: random.Random) -> str:
    word, other = rng.sample(WORDS, 2)
    a, b = rng.randint(0, MAX_NUMBER), rng.randint(0, MAX_NUMBER)
    words = rng.sample(WORDS, rng.randint(2, 4))
    nums = [rng.randint(0, MAX_SORT_NUMBER) for _ in range(rng.randint(3, 4))]
    choices = (
        f"{a} plus {b} is {a + b}.",
        f"{max(a, b)} minus {min(a, b)} is {max(a, b) - min(a, b)}.",
        f"The words {' '.join(words)} backwards are {' '.join(reversed(words))}.",
        f"In order, {' '.join(map(str, nums))} becomes {' '.join(map(str, sorted(nums)))}.",
        f"The word {word} has {len(word)} letters.",
        f"{word} in capitals is {word.upper()}.",
        ", ".join(words) + ".",
        f"The {word} is next to the {other}.",
        f"I see a {word} and a {other}.",
    )
    return rng.choice(choices)


def pretraining_corpus(n: int, seed: int) -> list[str]:
    """Plain (non-chat) sentences from the same world, used as the ptx corpus in RLHF."""
    rng = random.Random(seed)
    return [_plain_sentence(rng) for _ in range(n)]
