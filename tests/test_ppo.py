"""LoRA-PPO on the tiny starter model: zero KL and matched sampling/scoring at the start, the
reference adapter of a continued run (trl#1340), learning a known reward, what trains, ptx,
and the value head's RM initialisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from learner.ppo import (
    POLICY,
    PPOConfig,
    PPOState,
    make_ppo_state,
    ppo_step,
    ptx_forward,
    rollout,
    score,
    value_head_from_rm,
)
from learner.reward_model import ADAPTER, RewardModel, RMConfig
from rlhf.modeling import load_model
from rlhf.starter_data import make_tasks, pretraining_corpus


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def short(prompts, texts) -> torch.Tensor:
    """A known reward: shorter responses score higher (-characters / 20)."""
    return torch.tensor([-len(t) / 20 for t in texts])


def _prompts(n: int, seed: int) -> list[str]:
    return [t.prompt for t in make_tasks(n, seed)]


def _state(model_dir: Path, with_rm: bool = False, **cfg) -> tuple[PPOState, RewardModel | None]:
    loaded = load_model(str(model_dir), device="cpu")
    torch.manual_seed(0)
    base, rm = loaded.model, None
    if with_rm:
        rm = RewardModel(loaded.model, RMConfig(lora_rank=4))
        base = rm.peft
    cfg = {"batch_size": 16, "minibatch_size": 8, "max_new_tokens": 24, **cfg}
    return make_ppo_state(base, loaded.tokenizer, PPOConfig(**cfg), rm=rm,
                          scorer=None if with_rm else short), rm


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_start_has_zero_kl_and_scoring_matches_sampling(tiny_model_dir: Path, top_p: float):
    state, _ = _state(tiny_model_dir, with_rm=True, temperature=0.7, top_p=top_p)
    ro = rollout(state, _prompts(16, 1), keep_sample_logprobs=True)
    sc = score(state, ro)
    m = ro.response_mask.bool()
    assert m.sum() > 16 and (ro.response_mask.sum(1) < 24).any()  # some rows stop at EOS
    is_eos = ro.response == state.tokenizer.eos_token_id
    rows = is_eos.any(1)
    first_eos = is_eos[rows].int().argmax(1)
    assert (ro.response_mask.sum(1)[rows] == first_eos + 1).all()  # EOS: last response token
    assert (sc.logprobs - sc.ref_logprobs)[m].mean().abs() < 1e-5  # k1 ~ 0 before any update
    # Same temperature / top-p as generate's own processed scores: no negative-KL bug.
    assert torch.allclose(sc.logprobs[m], ro.sample_logprobs[m], atol=1e-4)
    assert sc.score.shape == (16,) and torch.isfinite(sc.values[m]).all()


def test_value_head_starts_as_the_rm_head(tiny_model_dir: Path):
    state, rm = _state(tiny_model_dir, with_rm=True)
    assert torch.equal(state.value_head.weight, rm.head.weight)
    assert torch.equal(state.value_head.bias, rm.head.bias + rm.bias)  # calibrated offset
    assert state.value_head.weight.data_ptr() != rm.head.weight.data_ptr()  # a copy
    with torch.no_grad():  # a calibrated RM: its offset becomes the value head's bias
        rm.bias.fill_(-0.75)
    value_head_from_rm(state, rm)
    assert torch.allclose(state.value_head.bias, rm.head.bias - 0.75)


def test_continued_run_uses_a_frozen_ref_adapter(tiny_model_dir: Path):
    """Continuing from a trained adapter: the reference is that adapter, not "adapter off"
    (trl#1340). The policy starts as a copy of it, so KL starts at 0 against it."""
    loaded = load_model(str(tiny_model_dir), device="cpu")
    peft = get_peft_model(loaded.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                          adapter_name="ref")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # a "trained" adapter, far from the base
    cfg = PPOConfig(batch_size=8, minibatch_size=4, max_new_tokens=16)
    state = make_ppo_state(peft, loaded.tokenizer, cfg, scorer=short, ref_adapter="ref")
    ro = rollout(state, _prompts(8, 2))
    sc, m = score(state, ro), ro.response_mask.bool()
    assert (sc.logprobs - sc.ref_logprobs)[m].abs().max() < 1e-5
    off = PPOState(**{**state.__dict__, "ref_adapter": None})
    sc_off = score(off, ro)
    assert (sc_off.logprobs - sc_off.ref_logprobs)[m].abs().mean() > 1e-2  # the base differs
    ref_before = {n: p.clone() for n, p in peft.named_parameters() if ".ref." in n}
    ppo_step(state, _prompts(8, 3))
    after = dict(peft.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in ref_before.items())


def _mean_score(state: PPOState, prompts: list[str]) -> float:
    state.step = 10_000  # fixed sampling seed for evaluation rollouts
    return torch.cat([short(None, rollout(state, prompts[i:i + 16]).texts)
                      for i in range(0, len(prompts), 16)]).mean().item()


def test_score_of_a_known_reward_rises(tiny_model_dir: Path):
    state, _ = _state(tiny_model_dir, lr=1e-2)
    held = _prompts(64, 7)
    before = _mean_score(state, held)
    train = _prompts(16 * 15, 5)
    for i in range(15):
        state.step = i
        stats = ppo_step(state, train[16 * i:16 * i + 16])
    after = _mean_score(state, held)
    assert after > before + 0.15, (before, after)
    expected = {"ppo/kl", "ppo/kl_k3", "ppo/reward", "ppo/score", "ppo/entropy",
                "ppo/clip_frac", "ppo/value_loss", "ppo/explained_var", "ppo/ptx_loss",
                "ppo/beta", "time/generate_s", "time/score_s", "time/train_s",
                "ppo/samples_per_s"}
    assert expected <= set(stats) and all(isinstance(v, float) for v in stats.values())
    assert stats["ppo/kl"] > 0 and stats["ppo/kl_k3"] > 0


def test_only_policy_lora_and_value_head_change(tiny_model_dir: Path):
    state, rm = _state(tiny_model_dir, with_rm=True, lr=1e-2, ptx_coef=1.0)
    named = dict(state.peft.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    rm_head, value_head = rm.head.weight.detach().clone(), state.value_head.weight.clone()
    for i in range(2):
        ppo_step(state, _prompts(16, 10 + i), pretraining_corpus(32, i))
    changed = {n for n, p in before.items() if not torch.equal(named[n], p)}
    assert changed and all(f".{POLICY}." in n and "lora_" in n for n in changed)
    assert not any(f".{ADAPTER}." in n for n in changed)  # rm adapter bit-identical
    assert torch.equal(rm.head.weight, rm_head) and rm.bias.item() == 0.0
    assert not torch.equal(state.value_head.weight, value_head)


def test_ptx_keeps_pretraining_loss_down(tiny_model_dir: Path):
    """Same seeds, ptx_coef 0 vs 1: the held-out corpus LM loss ends lower with ptx, and the
    ptx term shows in the same step's stats."""
    held = pretraining_corpus(32, 99)
    losses = {}
    for coef in (0.0, 1.0):
        state, _ = _state(tiny_model_dir, lr=1e-2, ptx_coef=coef)
        for i in range(6):
            state.step = i
            stats = ppo_step(state, _prompts(16, 20 + i), pretraining_corpus(32, 1000 + i))
        with torch.no_grad():
            losses[coef] = ptx_forward(state, held)[0].item()
        assert (stats["ppo/ptx_loss"] > 0) == (coef > 0)
    assert losses[1.0] < losses[0.0] - 0.3, losses


def test_ptx_gradient_reaches_the_policy_lora(tiny_model_dir: Path):
    state, _ = _state(tiny_model_dir, ptx_coef=1.0)
    loss, _ = ptx_forward(state, pretraining_corpus(4, 0))
    loss.backward()
    grads = [p.grad for p in state.policy_parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
