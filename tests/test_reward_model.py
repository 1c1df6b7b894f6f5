"""The reward model on the tiny starter model: K-wise batching, a frozen shared base, learning
a clear preference, bias calibration, and the held-out-labeler split."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from learner.reward_model import (
    ADAPTER,
    RewardModel,
    RMConfig,
    calibrate_bias,
    collate,
    encode_comparison,
    evaluate_rm,
    join_row,
    prompt_ids,
    split_by_labeler,
    train_reward_model,
)
from rlhf.modeling import load_model
from rlhf.starter_data import make_tasks, render_answer
from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import policy_pb2 as pb

RUDE = ("Ugh, fine.", "Whatever.", "Stop bothering me.", "Figure it out yourself.")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _comparison(cid: str, labeler: str, prompt: str, ranked: list[tuple[str, int]]
                ) -> fb.Comparison:
    record = fb.Comparison(id=cid, labeler_id=labeler,
                           messages=[pb.ChatMessage(role="user", content=prompt)])
    for position, (text, rank) in enumerate(ranked):
        record.candidates.add(text=text, rank=rank, position=position, adapter_version="base")
    return record


def polite_vs_rude(n: int, seed: int, labelers: int = 5) -> list[fb.Comparison]:
    """K = 3: polite and plain answers tie at rank 1; the same answer with a rude opener is
    rank 3. Only the tone differs, so the preference is clear but not a bag of fixed texts."""
    rng = random.Random(seed)
    out = []
    for i, task in enumerate(make_tasks(n, seed)):
        ranked = [(render_answer(task, "polite", rng), 1), (render_answer(task, "plain", rng), 1),
                  (f"{rng.choice(RUDE)} {render_answer(task, 'plain', rng)}", 3)]
        rng.shuffle(ranked)
        out.append(_comparison(f"cmp-{seed}-{i:05d}", f"labeler-{i % labelers}", task.prompt,
                               ranked))
    return out


def _rm(model_dir: Path, base=None, **overrides) -> tuple[RewardModel, object]:
    loaded = load_model(str(model_dir), device="cpu")
    torch.manual_seed(0)
    return RewardModel(base or loaded.model, RMConfig(lora_rank=4, **overrides)), loaded.tokenizer


def test_each_completion_is_forwarded_once(tiny_model_dir: Path):
    rm, tok = _rm(tiny_model_dir)
    task = make_tasks(1, 3)[0]
    rng = random.Random(0)
    k4 = _comparison("cmp-k4-000001", "a", task.prompt,
                     [(render_answer(task, s, rng), r) for r, s in
                      enumerate(("polite", "plain", "terse", "verbose"), start=1)])
    rows: list[int] = []
    rm.trunk.register_forward_pre_hook(
        lambda _m, _a, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    train_reward_model(rm, tok, [k4], RMConfig(batch=1, epochs=1))
    assert rows == [4]  # one forward, K = 4 rows: not 2 * C(4, 2) = 12
    # The pairwise form of the same ranking (what shuffled-pair trainers do) needs 12.
    pairs = [_comparison(f"cmp-pair-{i:06d}", "a", task.prompt, [(a.text, 1), (b.text, 2)])
             for i, (a, b) in enumerate((a, b) for j, a in enumerate(k4.candidates)
                                        for b in k4.candidates[j + 1:])]
    rows.clear()
    train_reward_model(rm, tok, pairs, RMConfig(batch=len(pairs), epochs=1))
    assert sum(rows) == 12  # in micro-batches of 4 pairs: [8, 4]


def test_only_rm_adapter_and_head_train_and_base_is_untouched(tiny_model_dir: Path):
    rm, tok = _rm(tiny_model_dir)
    trainable = {n for n, p in rm.peft.named_parameters() if p.requires_grad}
    assert trainable and all(f".{ADAPTER}." in n and "lora_" in n for n in trainable)
    # head weight trains; head bias is frozen (the K-wise loss cannot see an offset)
    assert rm.head.weight.requires_grad and not rm.head.bias.requires_grad
    assert {id(p) for p in rm.trainable_parameters()} == (
        {id(p) for p in rm.peft.parameters() if p.requires_grad} | {id(rm.head.weight)})
    base = {n: p.detach().clone() for n, p in rm.peft.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in rm.peft.named_parameters() if "lora_" in n}
    head_before = rm.head.weight.detach().clone()
    train_reward_model(rm, tok, polite_vs_rude(16, 1), RMConfig(batch=4))
    after = dict(rm.peft.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base.items())  # bit-identical base
    assert any(not torch.equal(after[n], p) for n, p in lora_before.items())
    assert not torch.equal(rm.head.weight, head_before)
    assert set(rm.state_dict()) == {"head.weight", "head.bias", "bias"}  # base not copied


def test_rm_joins_an_existing_shared_base(tiny_model_dir: Path):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    shared = get_peft_model(loaded.model, LoraConfig(r=2, target_modules=["q_proj"]),
                            adapter_name="policy")
    rm, _ = _rm(tiny_model_dir, base=shared)
    assert rm.peft is shared and set(shared.peft_config) == {"policy", ADAPTER}


def test_padding_side_does_not_change_the_score(tiny_model_dir: Path):
    rm, tok = _rm(tiny_model_dir)
    enc = encode_comparison(tok, polite_vs_rude(1, 2)[0], 128)
    ids, mask, _, _ = collate([enc], tok.pad_token_id, rm.device)
    lengths = mask.sum(1)
    left_ids, left_mask = torch.full_like(ids, tok.pad_token_id), torch.zeros_like(mask)
    for i, n in enumerate(lengths.tolist()):
        left_ids[i, ids.size(1) - n:], left_mask[i, ids.size(1) - n:] = ids[i, :n], 1
    with torch.no_grad():
        assert torch.allclose(rm.score(ids, mask), rm.score(left_ids, left_mask), atol=1e-5)


def test_learns_a_clear_preference_on_heldout_labelers(tiny_model_dir: Path):
    rm, tok = _rm(tiny_model_dir)
    train, heldout, info = split_by_labeler(polite_vs_rude(250, 7), 0.2, seed=0)
    assert info["split"] == "labeler" and len(heldout) == 50
    cfg = RMConfig(lr=3e-3, epochs=1, batch=8, max_length=128, seed=0)
    before = evaluate_rm(rm, tok, heldout, cfg)
    metrics = train_reward_model(rm, tok, train, cfg)
    after = evaluate_rm(rm, tok, heldout, cfg)
    assert metrics["rm/rows_forwarded"] == 3 * len(train)
    assert after["rm/pairs"] == 2 * len(heldout)  # the tie between polite and plain is no pair
    assert after["rm/accuracy"] > 0.8, (before, after)  # chance: 0.5; 0.97 at these seeds
    assert after["rm/loss"] < before["rm/loss"]


def test_bias_calibration_centres_reference_samples(tiny_model_dir: Path):
    rm, tok = _rm(tiny_model_dir)
    tasks = make_tasks(12, 5)
    rng = random.Random(0)
    reference = [([{"role": "user", "content": t.prompt}], render_answer(t, "plain", rng))
                 for t in tasks]
    with torch.no_grad():
        rm.head.bias.fill_(3.0)  # an uncentred RM
    info = calibrate_bias(rm, tok, reference, RMConfig(batch=2))
    rows = [join_row(prompt_ids(tok, m), tok(text, add_special_tokens=False)["input_ids"],
                     tok.eos_token_id, 512) for m, text in reference]
    ids = torch.full((len(rows), max(map(len, rows))), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    with torch.no_grad():
        scores = rm.score(ids, mask)
    assert abs(scores.mean().item()) < 1e-4
    assert info["rm/bias"] == pytest.approx(rm.bias.item())


def test_split_keeps_each_labeler_on_one_side():
    data = [_comparison(f"cmp-{i:08d}", f"labeler-{i % 7}", "hi", [("a", 1), ("b", 2)])
            for i in range(140)]
    train, heldout, info = split_by_labeler(data, 0.3, seed=1)
    assert info["split"] == "labeler" and len(train) + len(heldout) == len(data)
    held_labelers = {c.labeler_id for c in heldout}
    assert held_labelers == set(info["heldout_labelers"])
    assert held_labelers.isdisjoint({c.labeler_id for c in train})
    assert len(heldout) == 40  # two of seven equal labelers: closest to 30%
    assert split_by_labeler(data, 0.3, seed=1)[2] == info  # deterministic


def test_split_with_one_labeler_falls_back_to_ids():
    data = [_comparison(f"cmp-{i:08d}", "solo", "hi", [("a", 1), ("b", 2)]) for i in range(200)]
    train, heldout, info = split_by_labeler(data, 0.25, seed=0)
    assert info["split"] == "comparison_id" and "one labeler" in info["reason"]
    assert 30 <= len(heldout) <= 70 and len(train) + len(heldout) == 200
    again = split_by_labeler(list(reversed(data)), 0.25, seed=0)[1]
    assert {c.id for c in again} == {c.id for c in heldout}  # by id, not by order
    assert split_by_labeler(data, 0.0, seed=0)[1] == []


def test_micro_batches_add_up_to_the_whole_step(tiny_model_dir: Path):
    """micro_batch only changes how a step is forwarded (activation memory), not its
    gradient: the step's gradient is the mean over all its prompts either way."""
    from learner.reward_model import _encode_all, _train_epoch

    grads = {}
    for micro in (0, 1, 3):
        rm, tok = _rm(tiny_model_dir, micro_batch=micro, batch=8)
        batch = _encode_all(rm, tok, polite_vs_rude(8, 3), rm_cfg := RMConfig(
            lora_rank=4, micro_batch=micro, batch=8))
        opt = torch.optim.SGD(rm.trainable_parameters(), lr=0.0)  # keep the gradient only
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        tally = _train_epoch(rm, [batch], opt, sched, tok.pad_token_id, rm_cfg, epoch=0)
        assert tally.total[1].item() == 8  # every prompt counted once
        grads[micro] = torch.cat([p.grad.flatten() for p in rm.trainable_parameters()])
    assert grads[0].abs().sum() > 0
    for micro in (1, 3):
        assert torch.allclose(grads[micro], grads[0], rtol=1e-4, atol=1e-7), micro
