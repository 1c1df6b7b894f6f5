"""The learner's pure math against numbers worked by hand (arithmetic in the comments)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from learner.advantages import gae, kl_k1, kl_k3, kl_penalized_rewards
from learner.kl_control import AdaptiveKL, FixedKL
from learner.losses import (
    entropy_from_logits,
    explained_variance,
    kwise_rm_loss,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ptx_loss,
    value_loss,
)

T = torch.tensor
approx = pytest.approx


# ---------------------------------------------------------------- GAE
def test_gae_hand_example():
    # rewards [0, 0, 1], values [0.5, 0.6, 0.7], gamma 1, lambda 0.95, V after the end = 0:
    #   delta_2 = 1 + 0   - 0.7 = 0.3
    #   delta_1 = 0 + 0.7 - 0.6 = 0.1
    #   delta_0 = 0 + 0.6 - 0.5 = 0.1
    #   A_2 = 0.3
    #   A_1 = 0.1 + 0.95 * 0.3   = 0.385
    #   A_0 = 0.1 + 0.95 * 0.385 = 0.46575
    #   returns = A + V = [0.96575, 0.985, 1.0]
    adv, ret = gae(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), T([[1, 1, 1]]), 1.0, 0.95)
    assert adv[0].tolist() == approx([0.46575, 0.385, 0.3])
    assert ret[0].tolist() == approx([0.96575, 0.985, 1.0])


def test_gae_bootstraps_zero_after_last_valid_token():
    # Length-2 row padded to 3; the pad holds garbage (reward 5, value 9) that must not leak:
    #   delta_1 = 1 + 0 - 0.6 = 0.4;  delta_0 = 0 + 0.6 - 0.5 = 0.1
    #   A_1 = 0.4;  A_0 = 0.1 + 0.95 * 0.4 = 0.48;  A_pad = 0
    adv, ret = gae(T([[0.0, 1.0, 5.0]]), T([[0.5, 0.6, 9.0]]), T([[1, 1, 0]]), 1.0, 0.95)
    assert adv[0].tolist() == approx([0.48, 0.4, 0.0])
    assert ret[0].tolist() == approx([0.98, 1.0, 0.0])


def _gae_loop(rewards, values, lengths, gamma, lam):
    """Plain double loop: A_t = sum_l (gamma * lam)^l delta_{t+l}, V_L = 0."""
    out = [[0.0] * len(rewards[0]) for _ in rewards]
    for b, n in enumerate(lengths):
        v = [*values[b][:n], 0.0]
        deltas = [rewards[b][t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            out[b][t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
    return out


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7), (1.0, 1.0)])
def test_gae_matches_double_loop_on_random_data(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, L = 6, 9
    rewards, values = torch.randn(B, L, generator=g), torch.randn(B, L, generator=g)
    lengths = [9, 1, 4, 7, 2, 5]
    mask = (torch.arange(L)[None, :] < T(lengths)[:, None]).long()
    adv, ret = gae(rewards, values, mask, gamma, lam)
    expected = T(_gae_loop(rewards.tolist(), values.tolist(), lengths, gamma, lam))
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, (expected + values) * mask)


# ---------------------------------------------------------------- PPO policy / value
def test_ppo_clipped_objective_two_tokens():
    # eps 0.2. Token 0: A = +1, ratio 1.5 -> max(-1.5, -1 * 1.2) = -1.2  (clipped)
    #          Token 1: A = -2, ratio 0.9 -> max(1.8, 2 * 0.9)   =  1.8  (inside, not clipped)
    #          Token 2: padding with a huge advantage: ignored.
    # loss = (-1.2 + 1.8) / 2 = 0.3, clip_frac = 1/2.
    # approx_kl (k3, r = ratio): (0.5 - ln 1.5) = 0.0945349, (-0.1 - ln 0.9) = 0.0053605,
    #   mean 0.0499477.  ratio_mean = (1.5 + 0.9) / 2 = 1.2.
    logp_old = T([[-1.0, -1.0, -1.0]])
    logp_new = (logp_old + T([[math.log(1.5), math.log(0.9), 3.0]])).requires_grad_()
    loss, stats = ppo_policy_loss(logp_new, logp_old, T([[1.0, -2.0, 100.0]]), T([[1, 1, 0]]))
    assert loss.item() == approx(0.3)
    assert stats["clip_frac"].item() == approx(0.5)
    assert stats["approx_kl"].item() == approx(0.0499477, abs=1e-6)
    assert stats["ratio_mean"].item() == approx(1.2)
    # Gradient: the clipped token gets none; d/dlogp of (-A * ratio) / 2 = 2 * 0.9 / 2 = 0.9.
    loss.backward()
    assert logp_new.grad[0].tolist() == approx([0.0, 0.9, 0.0])


def test_ppo_pessimistic_side_is_not_clipped():
    # A = -1, ratio 1.5: max(1.5, 1.2) = 1.5: the worse (unclipped) branch is kept.
    loss, stats = ppo_policy_loss(T([[math.log(1.5)]]), T([[0.0]]), T([[-1.0]]), T([[1]]))
    assert loss.item() == approx(1.5)
    assert stats["clip_frac"].item() == 0.0


def test_value_loss_clipped_by_hand():
    # eps 0.2. Token 0: v_old 1.0, v 1.5, R 2.0: (1.5-2)^2 = 0.25, v_clip 1.2 -> 0.64; max 0.64
    #          Token 1: v_old 1.0, v 0.9, R 0.0: both 0.81 (inside the clip range)
    #          Token 2: padding.
    # loss = 0.5 * (0.64 + 0.81) / 2 = 0.3625, clip_frac = 1/2
    loss, stats = value_loss(T([[1.5, 0.9, 7.0]]), T([[1.0, 1.0, 0.0]]), T([[2.0, 0.0, -7.0]]),
                             T([[1, 1, 0]]))
    assert loss.item() == approx(0.3625)
    assert stats["clip_frac"].item() == approx(0.5)


def test_explained_variance():
    ret, mask = T([[1.0, 2.0, 3.0, 50.0]]), T([[1, 1, 1, 0]])
    assert explained_variance(ret, ret, mask).item() == approx(1.0)
    # constant prediction 2.0: Var[R - V] = Var[R] -> 0
    assert explained_variance(torch.full_like(ret, 2.0), ret, mask).item() == approx(0.0)


# ---------------------------------------------------------------- K-wise reward-model loss
def test_kwise_loss_k3_with_tie():
    # ranks (1, 1, 2), rewards (1, 0, -1): completions 0 and 1 tie, both beat 2.
    # pairs (0>2): diff 2 -> softplus(-2) = ln(1 + e^-2) = 0.1269280
    #       (1>2): diff 1 -> softplus(-1) = ln(1 + e^-1) = 0.3132617
    # loss = (0.1269280 + 0.3132617) / 2 = 0.2200948; accuracy 1, margin (2 + 1) / 2 = 1.5
    # (swapped order would give softplus(2), softplus(1) -> 1.72.)
    loss, stats = kwise_rm_loss(T([1.0, 0.0, -1.0]), T([0, 0, 0]), T([1, 1, 2]))
    assert loss.item() == approx(0.2200948, abs=1e-6)
    assert stats["n_pairs"].item() == 2
    assert stats["accuracy"].item() == approx(1.0)
    assert stats["margin"].item() == approx(1.5)


def test_kwise_loss_excludes_all_tie_prompt():
    # Prompt 7 (above) plus prompt 3 whose two answers tie: no pair, no weight, no gradient.
    rewards = T([5.0, 1.0, 0.0, -5.0, -1.0], requires_grad=True)
    loss, stats = kwise_rm_loss(rewards, T([3, 7, 7, 3, 7]), T([1, 1, 1, 1, 2]))
    assert loss.item() == approx(0.2200948, abs=1e-6)
    assert stats["n_prompts"].item() == 1
    loss.backward()
    assert rewards.grad[0].item() == 0.0 and rewards.grad[3].item() == 0.0


def test_kwise_loss_means_over_prompts_not_pairs():
    # Prompt A: the K=3 tie example, mean 0.2200948 over its 2 pairs.
    # Prompt B: K=2, winner scored 0, loser 1: diff -1 -> softplus(1) = 1.3132617 (wrong way).
    # batch loss = (0.2200948 + 1.3132617) / 2 = 0.7666783
    # (a mean over all 3 pairs would be (0.1269 + 0.3133 + 1.3133) / 3 = 0.5845)
    # accuracy 2/3, margin (2 + 1 - 1) / 3 = 2/3
    loss, stats = kwise_rm_loss(T([0.0, 1.0, 0.0, -1.0, 1.0]), T([1, 0, 0, 0, 1]),
                                T([0, 1, 1, 2, 1]))
    assert loss.item() == approx(0.7666783, abs=1e-6)
    assert stats["accuracy"].item() == approx(2 / 3)
    assert stats["margin"].item() == approx(2 / 3)
    assert stats["n_pairs"].item() == 3


def test_kwise_loss_all_ties_is_zero_with_graph():
    rewards = T([1.0, 2.0], requires_grad=True)
    loss, stats = kwise_rm_loss(rewards, T([0, 0]), T([1, 1]))
    loss.backward()
    assert loss.item() == 0.0 and stats["n_pairs"].item() == 0
    assert rewards.grad.tolist() == [0.0, 0.0]


# ---------------------------------------------------------------- KL estimators
P, Q = T([0.5, 0.3, 0.2]), T([0.2, 0.3, 0.5])
# KL(p||q) = 0.5 ln(0.5/0.2) + 0.3 ln 1 + 0.2 ln(0.2/0.5) = 0.3 ln 2.5 = 0.2748872
KL_PQ = 0.3 * math.log(2.5)


def test_kl_estimators_hand_values():
    # p(x) = 0.5, q(x) = 0.2: k1 = ln 2.5 = 0.9162907; r = 0.4, k3 = (0.4 - 1) - ln 0.4 = 0.3162907
    lp, lq = T([math.log(0.5)]), T([math.log(0.2)])
    assert kl_k1(lp, lq).item() == approx(0.9162907, abs=1e-6)
    assert kl_k3(lp, lq).item() == approx(0.3162907, abs=1e-6)
    # Exact expectation under p: k3 values (0.3162907, 0, 1.5 - ln 2.5 = 0.5837093),
    # 0.5 * 0.3162907 + 0.2 * 0.5837093 = 0.2748872 = KL(p||q); same for k1.
    assert (P * kl_k3(P.log(), Q.log())).sum().item() == approx(KL_PQ, abs=1e-6)
    assert (P * kl_k1(P.log(), Q.log())).sum().item() == approx(KL_PQ, abs=1e-6)


def test_kl_estimators_sampled_mean_matches_analytic_kl():
    # 200k samples from p; std of k1 ~ 0.72, so the standard error is ~0.002.
    x = torch.multinomial(P, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    lp, lq = P.log()[x], Q.log()[x]
    assert kl_k1(lp, lq).mean().item() == approx(KL_PQ, abs=0.01)
    assert kl_k3(lp, lq).mean().item() == approx(KL_PQ, abs=0.01)
    assert (kl_k3(lp, lq) >= 0).all()


def test_kl_penalized_rewards_score_on_last_valid_token():
    # logp - ref = 0.5 everywhere (padding too), beta 0.1 -> -0.05 per valid token.
    # row 0 has 2 tokens, score 3:  [-0.05, -0.05 + 3, 0, 0]
    # row 1 has 4 tokens, score -1: [-0.05, -0.05, -0.05, -0.05 - 1]
    # kl per row: 2 * 0.5 = 1.0, 4 * 0.5 = 2.0 -> mean 1.5; non_score_reward = -0.1 * 1.5
    logp = torch.full((2, 4), -1.0)
    mask = T([[1, 1, 0, 0], [1, 1, 1, 1]])
    rewards, stats = kl_penalized_rewards(T([3.0, -1.0]), logp, logp - 0.5, mask, beta=0.1)
    torch.testing.assert_close(rewards, T([[-0.05, 2.95, 0.0, 0.0],
                                           [-0.05, -0.05, -0.05, -1.05]]))
    assert stats["kl"].item() == approx(1.5)
    assert stats["non_score_reward"].item() == approx(-0.15)
    # k3 per token with log r = -0.5: e^-0.5 - 1 + 0.5 = 0.1065307; rows 2x and 4x -> mean 3x
    assert stats["kl_k3"].item() == approx(3 * (math.exp(-0.5) - 0.5), abs=1e-6)


def test_kl_penalized_rewards_empty_row_gets_no_score():
    rewards, _ = kl_penalized_rewards(T([3.0]), torch.zeros(1, 3), torch.zeros(1, 3),
                                      T([[0, 0, 0]]), beta=0.1)
    assert rewards.abs().sum().item() == 0.0


# ---------------------------------------------------------------- ptx, whitening, entropy
def test_ptx_loss_matches_cross_entropy_and_ignores_masked_tokens():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(2, 5, 7, generator=g), torch.randint(0, 7, (2, 5), generator=g)
    mask = T([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    loss, stats = ptx_loss(logits, labels, mask)
    # Position t predicts t+1; row 0 keeps 4 targets, row 1 keeps 2 (labels 1..2).
    kept_logits = torch.cat([logits[0, :4], logits[1, :2]])
    kept_labels = torch.cat([labels[0, 1:], labels[1, 1:3]])
    expected = F.cross_entropy(kept_logits, kept_labels)
    assert loss.item() == approx(expected.item(), abs=1e-6)
    assert stats["tokens"].item() == 6
    assert stats["perplexity"].item() == approx(math.exp(expected.item()), rel=1e-6)
    # Masked labels (even -100) and the logits that would predict them change nothing.
    labels2, logits2 = labels.clone(), logits.clone()
    labels2[1, 3:] = -100
    logits2[1, 2:] = 50.0
    assert ptx_loss(logits2, labels2, mask)[0].item() == approx(loss.item(), abs=1e-6)


def test_ptx_loss_uniform_logits():
    # uniform over V = 4: cross-entropy ln 4 = 1.3862944, perplexity 4
    loss, stats = ptx_loss(torch.zeros(1, 3, 4), T([[0, 1, 2]]), T([[1, 1, 1]]))
    assert loss.item() == approx(math.log(4))
    assert stats["perplexity"].item() == approx(4.0)


def test_masked_whiten_hand_and_padding():
    # valid [1, 2, 3]: mean 2, population var 2/3 -> [-1.2247449, 0, 1.2247449]; pad -> 0
    x, mask = T([[1.0, 2.0, 3.0, 100.0]]), T([[1, 1, 1, 0]])
    assert masked_whiten(x, mask)[0].tolist() == approx([-1.2247449, 0.0, 1.2247449, 0.0])
    # shift_mean=False keeps the mean: [0.7752551, 2, 3.2247449]
    assert masked_whiten(x, mask, shift_mean=False)[0, :3].tolist() == approx(
        [0.7752551, 2.0, 3.2247449])


def test_masked_whiten_random_mean0_std1_and_pad_independent():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 8, generator=g) * 3 + 5
    mask = (torch.arange(8)[None, :] < T([8, 3, 5, 1])[:, None]).long()
    w = masked_whiten(x, mask)
    valid = w[mask.bool()]
    assert valid.mean().item() == approx(0.0, abs=1e-5)
    assert valid.std(unbiased=False).item() == approx(1.0, abs=1e-4)
    x2 = torch.where(mask.bool(), x, T(1e6))
    torch.testing.assert_close(masked_whiten(x2, mask), w)
    assert masked_mean(x2, mask).item() == approx(x[mask.bool()].mean().item(), rel=1e-6)


def test_entropy_from_logits():
    # Position 0 uniform over 4: ln 4; position 1 nearly one-hot: ~0; position 2 masked.
    logits = T([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0], [0.0, 5.0, 1.0, 2.0]]])
    assert entropy_from_logits(logits, T([[1, 1, 0]])).item() == approx(math.log(4) / 2)


# ---------------------------------------------------------------- KL control
def test_fixed_kl_never_moves():
    ctl = FixedKL(0.02)
    ctl.update(100.0, 512)
    assert ctl.value == 0.02


def test_adaptive_kl_by_hand():
    # target 6, horizon 10000, n_steps 512:
    #   kl 6.6: error 6.6/6 - 1 = 0.1            -> beta *= 1 + 0.1 * 512/10000 = 1.00512
    #   kl 9:   error 0.5, clipped to  0.2       -> beta *= 1 + 0.2 * 0.0512    = 1.01024
    #   kl 3:   error -0.5, clipped to -0.2      -> beta *= 1 - 0.2 * 0.0512    = 0.98976
    #   kl 6:   error 0                          -> unchanged
    for kl, factor in [(6.6, 1.00512), (9.0, 1.01024), (3.0, 0.98976), (6.0, 1.0), (1e9, 1.01024)]:
        ctl = AdaptiveKL(0.1, target=6.0, horizon=10_000)
        assert ctl.update(kl, 512) == approx(0.1 * factor)
        assert ctl.value == approx(0.1 * factor)


def test_adaptive_kl_state_round_trip():
    ctl = AdaptiveKL(0.1, target=6.0, horizon=10_000)
    ctl.update(9.0, 512)
    fresh = AdaptiveKL(0.1, target=6.0, horizon=10_000)
    fresh.load_state_dict(ctl.state_dict())
    assert fresh.value == ctl.value
