"""Data-parallel training across processes started by ``torchrun`` (gloo on CPU, NCCL on GPU).

Every rank holds the whole (shared-base) model and the same global data; each takes its
``shard`` of every global batch, computes a loss on it, and ``all_reduce_grads`` sums the
gradients before the optimizer step. Callers weight their local loss by their share of the
global denominator (local prompts / global prompts, local tokens / global tokens), so the
summed gradient IS the gradient of the single-process loss over the global batch, and
gradient clipping, Adam and the LR schedule then see exactly what one process would see:
ranks stay bit-identical (all-reduce hands every rank the same sum) and match a single
process up to float rounding.

Why not ``DistributedDataParallel``: the model is one PeftModel carrying several adapters
("rm", "policy", maybe "ref") plus heads that are not its submodules, and each phase trains a
different subset (the RM phase only "rm" + its head, PPO only "policy" + the value head).
DDP registers hooks on every parameter that requires grad when it wraps the module, buckets
them, and with ``find_unused_parameters`` walks the graph every step to mark the others;
switching adapters between phases would need re-wrapping, and the heads outside the module
would not be reduced at all. One explicit flattened all-reduce of the parameters a phase
trains is simpler, exact, and one collective call per optimizer step (the LoRA + head
gradients are a few MB at most, so overlapping communication with backward buys little).

With world size 1 (no ``torchrun``, or ``WORLD_SIZE=1``) every function here is a no-op that
returns its input, so the single-process code paths do not change.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from learner.losses import masked_mean, masked_var

log = logging.getLogger(__name__)

T = TypeVar("T")
SEED_STRIDE = 1_000_003  # rank r samples with seed + r * SEED_STRIDE: rank 0 keeps the seed


def init_from_env(timeout_s: float | None = None, cuda: bool | None = None) -> torch.device:
    """Join the process group ``torchrun`` describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT in
    the environment) when WORLD_SIZE > 1; NCCL and ``cuda:LOCAL_RANK`` when CUDA is
    available (or ``cuda`` says so), else gloo on CPU. Returns the device this rank should
    put its model on. ``timeout_s``: how long a collective waits for the other ranks (None:
    torch's default)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if cuda is None else cuda
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=None if timeout_s is None else timedelta(seconds=timeout_s),
                                device_id=device if cuda else None)
        log.info("rank %d/%d joined (%s on %s)", rank(), world_size(),
                 dist.get_backend(), device)
    return device


def close() -> None:
    """Leave the process group (a no-op when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_leader() -> bool:
    """Rank 0: the one that logs, publishes and talks to the outside world."""
    return rank() == 0


def sample_seed(seed: int) -> int:
    """This rank's sampling seed: deterministic, different per rank, ``seed`` on rank 0."""
    return seed + rank() * SEED_STRIDE


def shard_bounds(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """[start, stop) of rank ``rank_``'s contiguous slice of ``n`` items; sizes differ by at
    most one, the first ``n % world`` ranks take the extra item."""
    r, w = rank() if rank_ is None else rank_, world_size() if world is None else world
    if not 0 <= r < w:
        raise ValueError(f"rank {r} outside world size {w}")
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (r < extra)


def shard(items: Sequence[T], rank_: int | None = None, world: int | None = None) -> list[T]:
    """This rank's contiguous slice of ``items`` (all of it with world size 1); the ranks'
    slices in rank order concatenate back to ``items``. May be empty when len < world."""
    start, stop = shard_bounds(len(items), rank_, world)
    return list(items[start:stop])


def _flat_grads(params: Sequence[nn.Parameter]) -> Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      .to(torch.float32) for p in params])


def all_reduce_grads(params: Sequence[nn.Parameter], extra: Tensor | None = None
                     ) -> Tensor | None:
    """SUM every ``p.grad`` over the ranks in ONE collective (flattened, float32), together
    with the optional float vector ``extra`` (per-step stats sums ride along for free).

    Callers weight their local loss so that the sum is the global mean (see module doc).
    A parameter without a grad counts as zeros and gets the summed grad (every rank trains
    the same parameters, all of which are in every step's graph; an empty shard contributes
    zeros). Returns the summed ``extra`` (or ``extra`` itself with world size 1)."""
    if world_size() == 1:
        return extra
    params = list(params)
    device = params[0].device if params else torch.device("cpu")
    parts = [_flat_grads(params)] if params else []
    if extra is not None:
        parts.append(extra.detach().to(device, torch.float32).reshape(-1))
    flat = torch.cat(parts)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = grad.clone()
        else:
            p.grad.copy_(grad)
        offset += n
    return None if extra is None else flat[offset:].to(extra.device, extra.dtype)


def all_reduce_sum(values: Tensor | Sequence[float]) -> Tensor:
    """Element-wise sum over ranks of a small float vector (counts, sums for global means)."""
    t = torch.as_tensor(values, dtype=torch.float64).clone()
    if world_size() > 1:
        device = _comm_device()
        t = t.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t.cpu()
    return t


def all_reduce_mean(value: Tensor | float) -> Tensor | float:
    """Mean over ranks of a metric (tensor or float; returns the same kind)."""
    if world_size() == 1:
        return value
    if isinstance(value, Tensor):
        return (all_reduce_sum(value.detach().double().cpu().reshape(-1)) / world_size()
                ).reshape(value.shape).to(value.dtype).to(value.device)
    return float(all_reduce_sum([float(value)])[0]) / world_size()


def mean_metrics(metrics: dict[str, float], skip: tuple[str, ...] = ()) -> dict[str, float]:
    """Average every float metric over ranks in one collective; keys starting with one of
    ``skip`` (e.g. wall-clock times) stay this rank's own. Every rank must pass the same
    keys."""
    if world_size() == 1:
        return metrics
    keys = sorted(k for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not k.startswith(skip))
    means = all_reduce_sum([float(metrics[k]) for k in keys]) / world_size()
    return {**metrics, **{k: float(v) for k, v in zip(keys, means.tolist(), strict=True)}}


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (prompts, comparisons, a rollout)."""
    if world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` with world size 1)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def broadcast_params(params: Sequence[Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values of ``params`` (a fresh LoRA / head) to every rank, in one
    flattened broadcast, so all ranks start bit-identical whatever their RNG state."""
    params = list(params)
    if world_size() == 1 or not params:
        return
    flat = torch.cat([p.detach().reshape(-1).to(torch.float32) for p in params])
    dist.broadcast(flat, src=src)
    offset = 0
    for p in params:
        p.copy_(flat[offset:offset + p.numel()].view_as(p).to(p.dtype))
        offset += p.numel()


def global_masked_moments(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, population variance) of ``x`` over the positions where ``mask`` is 1 on ALL
    ranks, computed as one process would: the global mean first, then the mean squared
    deviation from it (two tiny all-reduces; no sum-of-squares cancellation)."""
    if world_size() == 1:  # exactly the single-process statistics
        return masked_mean(x, mask), masked_var(x, mask)
    m = mask.to(x.dtype)
    total, count = all_reduce_sum([float((x * m).sum()), float(m.sum())]).tolist()
    mean = torch.tensor(total / max(count, 1.0), dtype=x.dtype, device=x.device)
    sq = float((((x - mean) ** 2) * m).sum())
    var = all_reduce_sum([sq])[0].item() / max(count, 1.0)
    return mean, torch.tensor(var, dtype=x.dtype, device=x.device)


def _comm_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo takes CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
