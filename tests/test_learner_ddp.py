"""Data-parallel training under torchrun (gloo, 2 CPU processes): ranks end bit-identical,
training happened, and the result matches ONE process on the same global batches.

``bench.ddp_check`` runs the RM phase and PPO under ``torchrun --nproc_per_node=2`` and,
as the reference, in this process (no process group); each rank saves snapshots of every
trained tensor and of the gradient its last step used.
PPO sampling differs per rank by design (seed + rank offset), so the PPO comparison with
one process uses the "replay" phase: one rollout of the whole batch from rank 0, scored,
whitened and trained on by both ranks' shards. The later ``ppo_step`` calls are checked for
rank agreement only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from learner import distributed as dd
from learner.losses import masked_mean, masked_var

ROOT = Path(__file__).resolve().parent.parent
SLOW = pytest.mark.slow  # torchrun starts 3 interpreters that import torch/transformers/peft


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """torchrun in a child while the single-process reference runs here (one interpreter
    fewer to start; ddp_check seeds everything it uses, and no process group exists here)."""
    from bench.ddp_check import run

    base = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "bench.ddp_check", "--model", str(tiny_model_dir), "--out", str(base / "ddp")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)  # its own process group: a kill takes the ranks along
    try:
        assert "WORLD_SIZE" not in os.environ
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        (base / "one").mkdir()
        assert run(str(tiny_model_dir), base / "one")["backend"] == "none"
        torch.set_num_threads(threads)
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"torchrun failed:\n{output[-4000:]}"
    summary = json.loads([line for line in output.splitlines() if line.startswith('{"rank"')][-1])
    assert summary["world"] == 2 and summary["backend"] == "gloo"
    return {"ddp": base / "ddp", "one": base / "one"}


@pytest.mark.parametrize("n,world", [(10, 2), (5, 2), (1, 2), (7, 3), (0, 2), (4, 1)])
def test_shards_are_contiguous_balanced_and_cover_everything(n: int, world: int):
    items = list(range(n))
    shards = [dd.shard(items, r, world) for r in range(world)]
    assert [x for s in shards for x in s] == items  # in rank order, nothing lost or doubled
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        dd.shard(items, world, world)


def test_one_process_is_untouched():
    """Without torchrun every helper is a no-op: single-process training is unchanged."""
    assert dd.world_size() == 1 and dd.rank() == 0 and dd.is_leader()
    assert dd.sample_seed(7) == 7 and dd.shard([1, 2, 3]) == [1, 2, 3]
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    extra = torch.tensor([4.0], dtype=torch.float64)
    assert dd.all_reduce_grads([p], extra) is extra and p.grad.tolist() == [1.0, 2.0, 3.0]
    x, mask = torch.randn(3, 5), torch.tensor([[1, 1, 0, 0, 0]] * 3)
    mean, var = dd.global_masked_moments(x, mask)
    assert torch.equal(mean, masked_mean(x, mask)) and torch.equal(var, masked_var(x, mask))
    metrics = {"a": 1.5, "time/x": 2.0}
    assert dd.mean_metrics(metrics) is metrics and dd.broadcast_object(metrics) is metrics


def _load(folder: Path, rank: int, phase: str) -> dict:
    return torch.load(folder / f"rank{rank}_{phase}.pt")


def _max_diff(a: dict, b: dict, keys) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in keys)


def _rel(a: dict, b: dict, keys) -> float:
    """||a - b|| / ||b|| over the tensors ``keys`` together."""
    keys = list(keys)
    assert keys
    num = sum(((a[k] - b[k]) ** 2).sum().item() for k in keys)
    return (num / sum((b[k] ** 2).sum().item() for k in keys)) ** 0.5


# The K-wise loss is blind to a constant, so the RM head's bias gets float noise as its
# gradient, and Adam turns noise into lr-sized steps (different in every run); what scores
# see is head bias + calibrated bias. The value head starts from the RM head, so its bias
# inherits that noise too.
OFFSETS = ("rm_head.head.bias", "rm_head.bias")


@SLOW
def test_ranks_start_different_and_end_identical(runs):
    """Ranks build their LoRA/heads from different seeds; broadcast + summed gradients make
    them (and the gradients they stepped with) bit-identical after every phase."""
    r0, r1 = _load(runs["ddp"], 0, "init")["tensors"], _load(runs["ddp"], 1, "init")["tensors"]
    assert any(not torch.equal(r0[k], r1[k]) for k in r0)
    for phase in ("rm", "ppo_init", "replay", "final"):
        a, b = _load(runs["ddp"], 0, phase)["tensors"], _load(runs["ddp"], 1, phase)["tensors"]
        assert a.keys() == b.keys() and any(k.startswith("grad.") for k in a)
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, (phase, different[:5])
    beta = [_load(runs["ddp"], r, "final")["metrics"]["beta"] for r in (0, 1)]
    assert beta[0] == beta[1] != 0.02  # the adaptive controller moved, on the global KL


@SLOW
def test_reward_model_matches_one_process(runs):
    """Same global batches (5 comparisons over 2 ranks: uneven 3 + 2 shards, last 2 + 1) ->
    the same gradients and RM as one process, up to float rounding."""
    init = _load(runs["one"], 0, "init")["tensors"]
    assert all(torch.equal(init[k], v) for k, v in _load(runs["ddp"], 0, "init")["tensors"]
               .items())  # rank 0 started where the single process did
    one, ddp = _load(runs["one"], 0, "rm"), _load(runs["ddp"], 0, "rm")
    t1, t2 = one["tensors"], ddp["tensors"]
    # The last step's summed gradient: measured 4e-7 relative (float rounding of the sums);
    # dropping the shard weights gives a clearly different direction.
    grads = [k for k in t1 if k.startswith("grad.") and not k.endswith(OFFSETS)]
    assert len(grads) == 17 and _rel(t2, t1, grads) < 1e-4
    keys = [k for k in init if k not in OFFSETS]
    moved = {k: t1[k] - init[k] for k in keys}
    assert _max_diff(t1, init, keys) > 1e-3  # training happened
    # Parameters after 3 AdamW steps: measured 6e-6 relative to the distance moved. Adam
    # normalises each element, so an element whose gradient is at float-noise level can
    # step +-lr either way; 5% leaves room for one such element, not for a wrong gradient.
    assert _rel({k: t2[k] - init[k] for k in keys}, moved, keys) < 0.05
    offset = {name: sum(t[k].item() for k in OFFSETS) for name, t in (("one", t1), ("ddp", t2))}
    assert offset["ddp"] == pytest.approx(offset["one"], abs=1e-5)
    m1, m2 = one["metrics"], ddp["metrics"]
    for key in ("rm/train_comparisons", "rm/steps", "rm/rows_forwarded", "rm/pairs",
                "rm/heldout_comparisons", "rm/reference_samples"):
        assert m2[key] == m1[key], key  # summed over ranks, not per rank
    for key in ("rm/train_loss", "rm/train_accuracy", "rm/accuracy", "rm/loss",
                "rm/reference_std"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5), key


@SLOW
def test_ppo_update_matches_one_process(runs):
    """One PPO update on the same rollout: global advantage whitening, token-weighted losses
    (response and ptx; the ranks hold different token counts) and the summed, then clipped,
    gradient equal one process's."""
    one, ddp = _load(runs["one"], 0, "replay"), _load(runs["ddp"], 0, "replay")
    t1, t2 = one["tensors"], ddp["tensors"]
    tokens = [_load(runs["ddp"], r, "replay")["metrics"]["tokens"] for r in (0, 1)]
    assert tokens[0] != tokens[1] and sum(tokens) == one["metrics"]["tokens"]
    policy = [k for k in t1 if k.startswith("grad.") and ".policy." in k]
    assert len(policy) == 16 and _rel(t2, t1, policy) < 1e-3  # measured 2.5e-5
    # The value head starts from the RM head (bias offset by ~1e-3 between runs, see
    # OFFSETS), which shifts its loss a little: measured 5e-4 and 1.1e-3.
    value = ["grad.value_head.weight", "grad.value_head.bias"]
    assert _rel(t2, t1, value) < 1e-2
    start = _load(runs["one"], 0, "ppo_init")["tensors"]
    assert _max_diff(t1, start, [k[5:] for k in policy]) > 1e-3  # the update moved it
    m1, m2 = one["metrics"], ddp["metrics"]
    assert m2["adv_abs_sum"] == pytest.approx(m1["adv_abs_sum"], rel=1e-4)  # global whitening
    assert m2["ppo/grad_norm"] == pytest.approx(m1["ppo/grad_norm"], rel=1e-3)  # global grads


@SLOW
def test_ppo_steps_train_on_every_rank(runs):
    """Two ppo_step calls with per-rank sampling move the policy further, identically on the
    ranks (checked above), and differently from one process (other samples)."""
    replay, final = _load(runs["ddp"], 0, "replay"), _load(runs["ddp"], 0, "final")
    policy = [k for k in final["tensors"] if ".policy." in k and not k.startswith("grad.")]
    assert _max_diff(final["tensors"], replay["tensors"], policy) > 1e-3
    one = _load(runs["one"], 0, "final")["tensors"]
    assert _max_diff(final["tensors"], one, policy) > 1e-4  # rank 1 sampled other responses
    steps = final["metrics"]["steps"]
    assert len(steps) == 2 and all(s["ppo/kl"] == s["ppo/kl"] for s in steps)  # not NaN
