"""The task queue: prompts operators queue for labelers, in Redis (docs/design.md §4b).

Operators load tasks (`rlhf tasks load FILE`, JSONL); the ranking UI leases the next one for
the logged-in labeler; serving's Feedback.Submit checks the lease of a Comparison that
names a ``task_id`` (``rlhf.task_submit``). A task: an id, the conversation to answer, how
many labelers should rank it (1; a configurable share of the file gets 2-3: the overlap
agreement is computed on), optionally fixed candidates, optionally a golden answer (a known
ranking of the fixed candidates, or the index of the known best one). Golden tasks are
mixed into a labeler's tasks at the UI's rate and look like any other.

Redis layout (prefix ``rlhf:tasks:``; one Redis, scripts name keys they derive from ids):
  ``task:<id>``          hash: id, messages (JSON [{role, content}]), wanted (0 = golden:
                         everyone once), candidates (JSON [{text, adapter_version, seed}] or
                         ""), golden (JSON {"ranking": [...]} | {"best": i} or ""), seq
  ``task:<id>:done``     set of labelers whose ranking of it is stored
  ``task:<id>:leases``   hash labeler -> lease expiry (Unix ms)
  ``task:<id>:skipped``  set of labelers who skipped it (never offered to them again)
  ``open``               zset of non-golden tasks with slots left, score = load order
  ``golden``             zset of golden tasks, score = load order
  ``lease:<labeler>``    the task the labeler holds (a reopened tab gets it back)
A slot is taken by a stored ranking or an unexpired lease; an expired lease frees it, so a
closed tab loses nothing; a task is never handed to a labeler who ranked or skipped it.
A task leaves ``open`` once its slots are ranked, so a lease scans (100 ids a page, oldest
first) only past tasks held by others or already done by this labeler: measured on one
Redis, ~2.6 ms a lease + release round trip when the first task is free; 146 ms in the
worst case of 4999 tasks all held by other labelers (the scan is one Lua call).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis

from rlhf.agreement import Golden, Ranking
from rlhf.contract import TASK_ID_RE, TASK_ID_RULE
from rlhf.task_scripts import FREEZE_LUA, LEASE_LUA

PREFIX = "rlhf:tasks:"
OPEN, GOLDEN, SEQ = PREFIX + "open", PREFIX + "golden", PREFIX + "seq"
MAX_CANDIDATES = 9


class TaskError(ValueError):
    """A bad task (or a bad task file line): ``field`` names what, the text says why."""

    def __init__(self, field: str, detail: str, line: int | None = None) -> None:
        where = f"line {line}: " if line else ""
        super().__init__(f"{where}{field} {detail}")
        self.field, self.detail, self.line = field, detail, line


@dataclass(frozen=True)
class Candidate:
    text: str
    adapter_version: str = "base"  # operator-written candidates are recorded as "base"
    seed: int = 0


@dataclass(frozen=True)
class Task:
    id: str
    messages: tuple[tuple[str, str], ...]  # (role, content), ending with the user's turn
    wanted: int = 1  # labelers who should rank it; 0 for golden (every labeler once)
    candidates: tuple[Candidate, ...] = ()  # fixed candidates; () = generate K fresh ones
    golden: Golden | None = None  # keyed by candidate text

    @property
    def is_golden(self) -> bool:
        return self.golden is not None


def task_key(task_id: str) -> str:
    return f"{PREFIX}task:{task_id}"


def lease_key(labeler: str) -> str:
    return f"{PREFIX}lease:{labeler}"


def _bucket(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / 16 ** 12


def check_task_id(value: str) -> None:
    if TASK_ID_RE.fullmatch(value) is None:
        raise TaskError("id", f"{value[:80]!r} must be {TASK_ID_RULE}")


def ranking_of(record) -> Ranking:
    """A Comparison's ranking keyed by candidate text (a repeated text gets "#2", "#3" in
    record order, the same for every labeler of one fixed candidate list)."""
    out: dict[str, int] = {}
    for c in record.candidates:
        key, n = c.text, 1
        while key in out:
            n += 1
            key = f"{c.text}#{n}"
        out[key] = c.rank
    return out


def record_problem(record, task: Task) -> tuple[str, str] | None:
    """(field, why) when a Comparison does not answer ``task`` as queued, else None."""
    if tuple((m.role, m.content) for m in record.messages) != task.messages:
        return "messages", f"are not the conversation of task {task.id!r}: send it as leased"
    if task.candidates and sorted(c.text for c in record.candidates) != sorted(
            c.text for c in task.candidates):
        return "candidates", f"are not the candidates of task {task.id!r}: rank those shown"
    return None


# -- parsing (pure) ---------------------------------------------------------------------------


def _messages(obj: Mapping) -> tuple[tuple[str, str], ...]:
    if "prompt" in obj:
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise TaskError("prompt", "is empty: give the user's message")
        return (("user", prompt.strip()),)
    raw = obj.get("messages")
    if not isinstance(raw, list) or not raw:
        raise TaskError("messages", "is missing: give a 'prompt' or 'messages' "
                        "[{role, content}, ...] ending with a user turn")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise TaskError(f"messages[{i}].role", "must be system, user or assistant")
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            raise TaskError(f"messages[{i}].content", "is empty")
        out.append((m["role"], content))
    if out[-1][0] != "user":
        raise TaskError("messages", "must end with a user turn (the one the answers answer)")
    return tuple(out)


def _candidates(obj: Mapping) -> tuple[Candidate, ...]:
    raw = obj.get("candidates") or []
    if not isinstance(raw, list):
        raise TaskError("candidates", "must be a list of answer texts")
    if raw and not 2 <= len(raw) <= MAX_CANDIDATES:
        raise TaskError("candidates", f"must hold 2..{MAX_CANDIDATES} answers, got {len(raw)}")
    texts = []
    for i, text in enumerate(raw):
        if not isinstance(text, str) or not text:
            raise TaskError(f"candidates[{i}]", "must be a non-empty answer text")
        texts.append(text)
    if len(set(texts)) != len(texts):
        raise TaskError("candidates", "repeats an answer: each must differ")
    return tuple(Candidate(t) for t in texts)


def _golden(obj: Mapping, candidates: Sequence[Candidate]) -> Golden | None:
    raw = obj.get("golden")
    if raw is None:
        return None
    k, texts = len(candidates), [c.text for c in candidates]
    if not k:
        raise TaskError("golden", "needs the 'candidates' it ranks")
    if not isinstance(raw, dict) or ("ranking" in raw) == ("best" in raw):
        raise TaskError("golden", "must be {\"ranking\": [rank per candidate]} or "
                        "{\"best\": index of the best candidate}")
    if "best" in raw:
        best = raw["best"]
        if not (isinstance(best, int) and not isinstance(best, bool) and 0 <= best < k):
            raise TaskError("golden.best", f"must be a candidate index 0..{k - 1}, got {best!r}")
        return Golden(best=texts[best])
    ranks = raw["ranking"]
    if not (isinstance(ranks, list) and len(ranks) == k):
        raise TaskError("golden.ranking", f"must give one rank per candidate ({k}), got "
                        f"{len(ranks) if isinstance(ranks, list) else ranks!r}")
    if not all(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= k for r in ranks):
        raise TaskError("golden.ranking", f"ranks must be 1..{k} (1 = best), got {ranks}")
    if len(set(ranks)) < 2:
        raise TaskError("golden.ranking", "ties every candidate: it can score nobody")
    return Golden(ranking=dict(zip(texts, ranks, strict=True)))


def parse_task(obj: object, overlap_share: float = 0.0, overlap_labelers: int = 2) -> Task:
    """One task from its JSON object; TaskError naming the field. Without an ``id`` the id
    is a hash of the conversation (loading a file twice stores each task once); without
    ``labelers``, a deterministic ``overlap_share`` of tasks wants ``overlap_labelers``."""
    if not isinstance(obj, dict):
        raise TaskError("task", "must be a JSON object")
    messages = _messages(obj)
    task_id = obj.get("id")
    if task_id is None:
        task_id = "t-" + hashlib.sha256(json.dumps(messages).encode()).hexdigest()[:16]
    if not isinstance(task_id, str):
        raise TaskError("id", "must be a string")
    check_task_id(task_id)
    candidates = _candidates(obj)
    golden = _golden(obj, candidates)
    wanted = obj.get("labelers")
    if wanted is None:
        wanted = overlap_labelers if _bucket(task_id) < overlap_share else 1
    if not (isinstance(wanted, int) and not isinstance(wanted, bool) and 1 <= wanted <= 9):
        raise TaskError("labelers", f"must be 1..9, got {wanted!r}")
    return Task(task_id, messages, 0 if golden else wanted, candidates, golden)


def parse_lines(lines: Sequence[str], overlap_share: float = 0.0, overlap_labelers: int = 2
                ) -> list[Task]:
    """Every task of a JSONL text, or TaskError at the first bad line (nothing half-done):
    empty prompts, bad golden answers and ids repeated in the file are refused."""
    tasks, seen = [], {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            task = parse_task(json.loads(line), overlap_share, overlap_labelers)
        except json.JSONDecodeError as exc:
            raise TaskError("line", f"is not JSON: {exc.msg}", n) from None
        except TaskError as exc:
            raise TaskError(exc.field, exc.detail, n) from None
        if task.id in seen:
            raise TaskError("id", f"{task.id!r} repeats line {seen[task.id]}", n)
        seen[task.id] = n
        tasks.append(task)
    if not tasks:
        raise TaskError("file", "holds no task")
    return tasks


# -- the hash form --------------------------------------------------------------------------


def to_hash(task: Task) -> dict[str, str]:
    g = task.golden
    golden = "" if g is None else json.dumps(
        {"best": g.best} if g.best is not None else {"ranking": dict(g.ranking or {})})
    return {"id": task.id, "wanted": str(task.wanted), "golden": golden,
            "messages": json.dumps([{"role": r, "content": c} for r, c in task.messages]),
            "candidates": json.dumps([vars(c) for c in task.candidates])
            if task.candidates else ""}


def from_hash(h: Mapping) -> Task:
    d = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes)
                                                       else v) for k, v in h.items()}
    g = json.loads(d["golden"]) if d.get("golden") else None
    golden = None if g is None else Golden(ranking=g.get("ranking"), best=g.get("best"))
    cands = tuple(Candidate(**c) for c in json.loads(d["candidates"])) if d.get(
        "candidates") else ()
    return Task(d["id"], tuple((m["role"], m["content"]) for m in json.loads(d["messages"])),
                int(d["wanted"]), cands, golden)


# -- Redis --------------------------------------------------------------------------------

# All or nothing: refuse the whole batch if any id is queued already, else write them all.
# ARGV: prefix, then per task: id, golden? ("1"/"0"), its hash as a JSON object.
LOAD_LUA = """
local P = ARGV[1]
for i = 2, #ARGV, 3 do
  if redis.call('EXISTS', P .. 'task:' .. ARGV[i]) == 1 then return ARGV[i] end
end
for i = 2, #ARGV, 3 do
  local id, fields = ARGV[i], cjson.decode(ARGV[i + 2])
  local seq = redis.call('INCR', P .. 'seq')
  for k, v in pairs(fields) do redis.call('HSET', P .. 'task:' .. id, k, v) end
  redis.call('HSET', P .. 'task:' .. id, 'seq', seq)
  redis.call('ZADD', P .. (ARGV[i + 1] == '1' and 'golden' or 'open'), seq, id)
end
return false
"""


def load(client: redis.Redis, tasks: Sequence[Task]) -> int:
    """Queue ``tasks`` atomically; TaskError (nothing stored) if an id is queued already."""
    args: list[str] = [PREFIX]
    for t in tasks:
        args += [t.id, "1" if t.is_golden else "0", json.dumps(to_hash(t))]
    clash = client.eval(LOAD_LUA, 0, *args)
    if clash:
        name = clash.decode() if isinstance(clash, bytes) else clash
        raise TaskError("id", f"{name!r} is queued already; nothing was loaded")
    return len(tasks)


def get(client: redis.Redis, task_id: str) -> Task | None:
    h = client.hgetall(task_key(task_id))
    return from_hash(h) if h else None


def lease(client: redis.Redis, labeler: str, lease_s: float = 600.0, golden_rate: float = 0.0,
          rng: random.Random | None = None, now_ms: int | None = None) -> Task | None:
    """The task ``labeler`` should rank next (their unexpired lease first, then a golden one
    with probability ``golden_rate``, then the oldest open one with a free slot), leased for
    ``lease_s``; None when nothing is left for them."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    gold = (rng or random).random() < golden_rate
    task_id = client.eval(LEASE_LUA, 0, PREFIX, labeler, now, int(lease_s * 1000),
                          "1" if gold else "0")
    if not task_id:
        return None
    return get(client, task_id.decode() if isinstance(task_id, bytes) else task_id)


def release(client: redis.Redis, task_id: str, labeler: str, skip: bool = True) -> None:
    """Give the lease back; ``skip``: never offer this task to ``labeler`` again."""
    pipe = client.pipeline(transaction=True)
    pipe.hdel(task_key(task_id) + ":leases", labeler)
    if skip:
        pipe.sadd(task_key(task_id) + ":skipped", labeler)
    pipe.delete(lease_key(labeler))
    pipe.execute()


def freeze_candidates(client: redis.Redis, task_id: str, candidates: Sequence[Candidate]
                      ) -> tuple[Candidate, ...]:
    """Fix the candidates of a task that had none (the first labeler's K fresh answers), so
    every overlapping labeler ranks the same ones; the first to freeze wins. Returns the
    task's candidates after the call."""
    raw = client.eval(FREEZE_LUA, 1, task_key(task_id),
                      json.dumps([vars(c) for c in candidates]))
    if raw is None:
        raise TaskError("task_id", f"{task_id!r} is not a queued task")
    return tuple(Candidate(**c) for c in json.loads(raw))


def golden_map(client: redis.Redis) -> dict[str, Golden]:
    """Every golden task's known answer, by task id (what agreement scores labelers with)."""
    ids = [i.decode() if isinstance(i, bytes) else i for i in client.zrange(GOLDEN, 0, -1)]
    if not ids:
        return {}
    pipe = client.pipeline(transaction=False)
    for task_id in ids:
        pipe.hget(task_key(task_id), "golden")
    out = {}
    for task_id, raw in zip(ids, pipe.execute(), strict=True):
        if raw:
            g = json.loads(raw)
            out[task_id] = Golden(ranking=g.get("ranking"), best=g.get("best"))
    return out
