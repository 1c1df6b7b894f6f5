"""The engine's pure sampling against hand-worked numbers, and batching against HF generate."""

from __future__ import annotations

import asyncio
import math

import torch

from serving.adapters import AdapterManager
from serving.engine import Engine, Sampling
from serving.sampling import sample_next
from tests.conftest import chat_prompt_ids


def pick(logits, u, temperature=1.0, top_k=0, top_p=1.0) -> int:
    return int(sample_next(torch.tensor([logits]), torch.tensor([temperature]),
                           torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([u]))[0])


def test_inverse_cdf_sampling_by_hand():
    # p = (0.5, 0.3, 0.2): cumulative 0.5, 0.8, 1.0
    logits = [math.log(0.5), math.log(0.3), math.log(0.2)]
    assert [pick(logits, u) for u in (0.0, 0.49, 0.51, 0.79, 0.81, 0.999)] == [0, 0, 1, 1, 2, 2]


def test_top_p_and_top_k_by_hand():
    logits = [math.log(0.5), math.log(0.3), math.log(0.2)]
    # top_p 0.6 keeps {0, 1} (mass before token 1 is 0.5 < 0.6): renormalised 0.625 / 0.375.
    assert [pick(logits, u, top_p=0.6) for u in (0.6, 0.63, 0.99)] == [0, 1, 1]
    # top_p 0.5 keeps token 0 alone.
    assert pick(logits, 0.99, top_p=0.5) == 0
    # top_k 2 keeps {0, 1}, like top_p 0.6.
    assert [pick(logits, u, top_k=2) for u in (0.6, 0.63)] == [0, 1]


def test_temperature_by_hand():
    # logits (0, ln 2): T=1 gives (1/3, 2/3); T=0.5 gives (1/5, 4/5); sorted: token 1 first.
    logits = [0.0, math.log(2.0)]
    assert pick(logits, 0.6) == 1 and pick(logits, 0.7) == 0
    assert pick(logits, 0.7, temperature=0.5) == 1 and pick(logits, 0.85, temperature=0.5) == 0
    assert pick(logits, 0.99, temperature=0.0) == 1  # greedy ignores the uniform


def test_rows_keep_their_own_parameters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]] * 3))
    out = sample_next(logits, torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]),
                      torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.9, 0.9, 0.9]))
    assert out.tolist() == [2, 0, 0]


def test_continuous_batching_matches_one_at_a_time_generate(loaded):
    """Requests of different lengths joining a running batch decode exactly as alone."""
    prompts = [chat_prompt_ids(loaded, t) for t in
               ("hi", "What is 12 + 30?", "Reverse these words: red green blue yellow",
                "Sort these numbers: 9 4 7 1 3 8")]
    steps = 24
    expected = []
    for ids in prompts:
        out = loaded.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=steps,
                                    min_new_tokens=steps,
                                    pad_token_id=loaded.tokenizer.pad_token_id)
        expected.append(out[0, len(ids):].tolist())
    engine = Engine(loaded.tokenizer, adapters=AdapterManager(loaded.model),
                    eos_token_ids=loaded.eos_token_ids, context_length=loaded.context_length,
                    max_batch_size=8, max_queue=8, threads=1)
    engine.start()

    async def run_one(i: int, ids: list[int]) -> str:
        await asyncio.sleep(0.004 * i)  # later requests join a batch already decoding
        handle = engine.submit(f"r{i}", ids, 1, Sampling(steps, temperature=0.0,
                                                         min_new_tokens=steps))
        return "".join([e.text for events in [ev async for ev in handle] for e in events])

    async def main() -> list[str]:
        return await asyncio.gather(*[run_one(i, ids) for i, ids in enumerate(prompts)])

    try:
        texts = asyncio.run(main())
    finally:
        engine.stop()
    decode = loaded.tokenizer.decode
    assert texts == [decode(e, skip_special_tokens=True) for e in expected]
    assert engine.steps < 2 * steps  # they shared decode steps (one by one: >= 4 x steps)


def test_a_cancelled_waiting_request_frees_its_queue_place(loaded):
    from serving.engine import QueueFull

    engine = Engine(loaded.tokenizer, adapters=AdapterManager(loaded.model),
                    eos_token_ids=loaded.eos_token_ids, context_length=loaded.context_length,
                    max_batch_size=1, max_queue=1, threads=1)
    engine.start()
    ids = chat_prompt_ids(loaded, "hi")
    long = Sampling(200, min_new_tokens=200)

    async def main() -> str:
        running = engine.submit("a", ids, 1, long)
        await running.__aiter__().__anext__()  # "a" holds the only slot
        queued = engine.submit("b", ids, 1, long)
        try:
            engine.submit("c", ids, 1, long)
            return "accepted while the queue was full"
        except QueueFull:
            pass
        queued.cancel()  # the caller of "b" went away while it waited
        engine.submit("d", ids, 1, long).cancel()  # accepted: b's place is free again
        running.cancel()
        return "ok"

    try:
        assert asyncio.run(main()) == "ok"
    finally:
        engine.stop()


def test_rows_leaving_and_longer_prompts_joining_decode_exactly_as_alone(loaded):
    """Rows finish at different steps (their slots are refilled by other rows) while
    longer prompts join later; every row still decodes as it would alone, n=2 included."""
    texts = ("hi", "Sort these numbers: 9 4 7 1 3 8 2 6 5", "What is 12 + 30?",
             "Reverse these words: red green blue yellow orange purple black white")
    prompts = [chat_prompt_ids(loaded, t) for t in texts]
    lengths = [5, 30, 9, 17]
    expected = []
    for ids, steps in zip(prompts, lengths, strict=True):
        out = loaded.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=steps,
                                    min_new_tokens=steps,
                                    pad_token_id=loaded.tokenizer.pad_token_id)
        expected.append(loaded.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
    engine = Engine(loaded.tokenizer, adapters=AdapterManager(loaded.model),
                    eos_token_ids=loaded.eos_token_ids, context_length=loaded.context_length,
                    max_batch_size=8, max_queue=8, threads=1)
    engine.start()

    async def run_one(i: int) -> list[str]:
        await asyncio.sleep(0.02 * i)  # later (and longer) prompts join a running batch
        handle = engine.submit(f"r{i}", prompts[i], 2,
                               Sampling(lengths[i], temperature=0.0, min_new_tokens=lengths[i]))
        out = ["", ""]
        async for events in handle:
            for e in events:
                out[e.index] += e.text
        return out

    async def main() -> list[list[str]]:
        return await asyncio.gather(*[run_one(i) for i in range(len(prompts))])

    try:
        got = asyncio.run(main())
    finally:
        engine.stop()
    assert got == [[e, e] for e in expected]


def test_uniform_is_splitmix64_by_hand():
    """SplitMix64 seeded with 0 first outputs 0xE220A8397B1DCDAF (the reference value of
    Vigna's splitmix64.c); our uniform is its top 53 bits over 2^53."""
    from serving.sampling import uniform

    assert uniform(0, 0) == (0xE220A8397B1DCDAF >> 11) / 2**53
    assert uniform(0, 1) == (0x6E789E6AA1B965F4 >> 11) / 2**53
    assert all(0.0 <= uniform(seed, step) < 1.0 for seed in (0, 2**64 - 1) for step in range(50))


def test_partial_sort_sampling_picks_what_the_full_sort_picks():
    """Sampling looks at the few most likely tokens first; wherever the kept set or the
    uniform reaches past them (flat rows, uniforms near 1, top_p/top_k beyond them) the
    answer must still be the full-sort rule's."""
    from serving.sampling import _sample_sorted

    gen = torch.Generator().manual_seed(0)
    rows, vocab = 64, 300
    logits = torch.randn(rows, vocab, generator=gen) * torch.linspace(0.1, 6.0, rows)[:, None]
    temperature = torch.rand(rows, generator=gen) + 0.2
    top_k = torch.randint(0, 40, (rows,), generator=gen) * (torch.arange(rows) % 3 == 0)
    top_p = torch.where(torch.arange(rows) % 2 == 0, torch.ones(rows),
                        torch.rand(rows, generator=gen) * 0.9 + 0.05)
    u = torch.rand(rows, generator=gen)
    u[::4] = 0.999  # deep in the tail
    want = _sample_sorted(logits / temperature[:, None], top_k, top_p, u)
    for candidates in [(4,), (4, 16), (64,), ()]:
        got = sample_next(logits, temperature, top_k, top_p, u, candidates=candidates)
        assert got.tolist() == want.tolist(), candidates
