"""One request's data cannot fail its neighbours, and free batch slots are never refused.

The in-process engine with the tiny model. ``top_k = 2**63`` is a real input that makes
an engine step raise (the sampler's int64 tensor cannot hold it); the service refuses it
at the wire (tests/test_wire_hardening.py), so here it is handed to the engine directly,
as a value that slipped past validation would be.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading

from serving.adapters import AdapterManager
from serving.engine import Engine, QueueFull, Sampling
from tests.conftest import chat_prompt_ids

PROMPTS = ("hi", "What is 12 + 30?", "Reverse these words: red green blue yellow",
           "Sort these numbers: 9 4 7 1 3 8")
HEALTHY = Sampling(20, temperature=1.0, min_new_tokens=20)
POISON = dataclasses.replace(HEALTHY, top_k=2**63)


def _engine(loaded, max_batch_size: int = 16, max_queue: int = 16) -> Engine:
    engine = Engine(loaded.tokenizer, adapters=AdapterManager(loaded.model),
                    eos_token_ids=loaded.eos_token_ids, context_length=loaded.context_length,
                    max_batch_size=max_batch_size, max_queue=max_queue, threads=1)
    engine.start()
    return engine


async def _text(handle) -> dict[int, str]:
    texts: dict[int, str] = {}
    async for events in handle:
        for e in events:
            texts[e.index] = texts.get(e.index, "") + e.text
    return texts


def _healthy_alone(loaded) -> list[dict[int, str]]:
    """What each healthy request streams when it runs by itself (the reference)."""
    engine = _engine(loaded)

    async def main() -> list[dict[int, str]]:
        out = []
        for i, text in enumerate(PROMPTS):
            out.append(await _text(engine.submit(f"h{i}", chat_prompt_ids(loaded, text), 2,
                                                 dataclasses.replace(HEALTHY, seed=100 + i))))
        return out

    try:
        return asyncio.run(main())
    finally:
        engine.stop()


async def _outcome(handle) -> dict[int, str] | BaseException:
    try:
        return await _text(handle)
    except Exception as exc:
        return exc


def test_a_poisoned_request_admitted_with_healthy_ones_fails_alone(loaded):
    expected = _healthy_alone(loaded)
    engine = _engine(loaded)

    async def main() -> list:
        handles = []
        for i, text in enumerate(PROMPTS):  # submitted together: one prefill takes them all
            handles.append(engine.submit(f"h{i}", chat_prompt_ids(loaded, text), 2,
                                         dataclasses.replace(HEALTHY, seed=100 + i)))
            if i == 1:
                handles.append(engine.submit("poison", chat_prompt_ids(loaded, "hello"), 2, POISON))
        return await asyncio.gather(*[_outcome(h) for h in handles])

    try:
        outcomes = asyncio.run(main())
        poisoned = outcomes.pop(2)
        assert isinstance(poisoned, Exception), poisoned
        assert outcomes == expected  # every neighbour streamed exactly its own text
        # and the engine serves on
        assert _serves(engine, loaded)
    finally:
        engine.stop()


def test_a_request_that_breaks_mid_stream_fails_alone(loaded):
    """The decode step (every running row at once) fails because of one request's data."""
    expected = _healthy_alone(loaded)
    engine = _engine(loaded)

    async def main() -> tuple[list, object]:
        healthy = [engine.submit(f"h{i}", chat_prompt_ids(loaded, text), 2,
                                 dataclasses.replace(HEALTHY, seed=100 + i))
                   for i, text in enumerate(PROMPTS)]
        victim = engine.submit("victim", chat_prompt_ids(loaded, "hello"), 3, HEALTHY)

        async def break_after_first_event():
            async for _ in victim:
                # From now on its rows make the sampler raise in every decode step.
                victim.sampling = POISON
            return "finished"

        victim_task = asyncio.ensure_future(_catch(break_after_first_event()))
        results = await asyncio.gather(*[_outcome(h) for h in healthy])
        return results, await victim_task

    try:
        results, victim = asyncio.run(main())
        assert isinstance(victim, Exception), victim
        assert results == expected
    finally:
        engine.stop()


def _serves(engine: Engine, loaded) -> bool:
    async def one() -> dict[int, str] | BaseException:
        return await _outcome(engine.submit("after", chat_prompt_ids(loaded, "hi"), 1, HEALTHY))

    after = asyncio.run(one())
    return isinstance(after, dict) and bool(after[0])


async def _catch(coro):
    try:
        return await coro
    except Exception as exc:
        return exc


def _blocked(engine: Engine) -> threading.Event:
    """Hold the engine thread between two steps; set the returned event to let it go."""
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(60)

    engine.call_soon(hold)
    assert started.wait(60)
    return release


def test_requests_that_fit_free_slots_are_admitted_whatever_the_queue_limit(loaded):
    """max_queue counts requests waiting for a slot, not those about to take a free one."""
    engine = _engine(loaded, max_batch_size=64, max_queue=8)
    ids = chat_prompt_ids(loaded, "hi")
    short = Sampling(2)

    async def main() -> tuple[int, str]:
        release = _blocked(engine)  # 16 requests arrive before the engine thread looks
        try:
            handles = [engine.submit(f"r{i}", ids, 1, short) for i in range(16)]
        finally:
            release.set()
        outcomes = await asyncio.gather(*[_outcome(h) for h in handles])
        return sum(isinstance(o, dict) for o in outcomes), "ok"

    try:
        assert asyncio.run(main()) == (16, "ok")
    finally:
        engine.stop()


def test_requests_beyond_the_free_slots_still_meet_the_queue_limit(loaded):
    engine = _engine(loaded, max_batch_size=64, max_queue=8)
    ids = chat_prompt_ids(loaded, "hi")
    short = Sampling(2)

    async def main() -> str:
        release = _blocked(engine)
        handles = []
        try:
            # 8 requests of 8 alternatives fill the 64 slots; 8 more wait; the next is refused
            handles = [engine.submit(f"r{i}", ids, 8, short) for i in range(16)]
            try:
                handles.append(engine.submit("one-too-many", ids, 8, short))
                return "accepted beyond the queue limit"
            except QueueFull as exc:
                assert "8 requests are already waiting" in str(exc)
        finally:
            release.set()
        outcomes = await asyncio.gather(*[_outcome(h) for h in handles])
        assert all(isinstance(o, dict) and len(o) == 8 for o in outcomes)
        return "ok"

    try:
        assert asyncio.run(main()) == "ok"
    finally:
        engine.stop()


def test_run_isolated_fails_only_the_part_that_fails_alone():
    """The control flow by hand: the batch fails, each part runs alone, b fails alone."""
    from serving.isolation import run_isolated

    log: list[str] = []
    state = {"v": 0}

    def phase() -> None:
        state["v"] = 99  # a partial change the rollback must undo
        raise ValueError("batch")

    def part(name: str):
        def run() -> None:
            log.append(f"run {name}")
            state["v"] += 1
            if name == "b":
                raise ValueError("b alone")
        return run

    failed: list[tuple[str, str]] = []
    run_isolated(phase, lambda: [(n, part(n)) for n in "abc"], lambda: state["v"],
                 lambda v: state.update(v=v), lambda n, exc: failed.append((n, str(exc))))
    assert log == ["run a", "run b", "run c"]
    assert failed == [("b", "b alone")]
    assert state["v"] == 2  # a and c applied; the batch's and b's changes rolled back
