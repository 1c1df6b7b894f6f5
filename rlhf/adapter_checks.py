"""Value checks on adapter weights, and the fingerprint a refusal is remembered by.

Shared by the learner's publisher (nothing it refuses reaches the store) and serving
(nothing it refuses goes live): ``rlhf/adapter_store.py`` calls these in ``publish`` and
``verify``.

Bounds. LoRA factors start at |A| <= 1/sqrt(in_features) (kaiming-uniform) and B = 0 and
move by small learning-rate steps; every trained adapter we know of stays far below 1 in
magnitude. A factor entry beyond ``MAX_ABS`` (16) or a root-mean-square beyond ``MAX_RMS``
(4, i.e. a Frobenius norm above 4 * sqrt(numel) for the tensor's shape) means the run
diverged or the file was tampered with: with those weights the adapter's update swamps
the base model's activations (and in float16 overflows), so every answer turns into the
same garbage. A non-finite entry (NaN, inf) is always refused. The config's scale
(``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA) multiplies the whole update; recipes use
1 to 4 (our learner: 2), so a scale beyond ``MAX_SCALE`` (64) is refused the same way.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are checked: `rlhf adapters list` stays light
    import torch

MAX_ABS = 16.0
MAX_RMS = 4.0
MAX_SCALE = 64.0


def config_problem(config: object, max_scale: float = MAX_SCALE) -> str | None:
    """Why an ``adapter_config.json`` must not be served, or None (pure)."""
    if not isinstance(config, dict):
        return "adapter_config.json is not a JSON object"
    r, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        return f"adapter_config.json: r must be a positive integer, got {r!r}"
    if (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
            or not math.isfinite(alpha) or alpha <= 0):
        return f"adapter_config.json: lora_alpha must be a positive number, got {alpha!r}"
    scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    if scale > max_scale:
        return f"adapter_config.json: scale lora_alpha/r = {scale:.3g} > {max_scale:g}"
    return None


def tensor_problem(name: str, tensor: torch.Tensor, max_abs: float = MAX_ABS,
                   max_rms: float = MAX_RMS) -> str | None:
    """Why ``tensor`` must not be served, or None. Non-float tensors are not checked."""
    import torch

    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    values = tensor.detach().to(torch.float32)
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        return f"{name} has {bad} non-finite value(s) (NaN/inf)"
    peak = float(values.abs().max())
    if peak > max_abs:
        return f"{name} has |value| {peak:.3g} > {max_abs:g}"
    rms = float(values.norm()) / math.sqrt(values.numel())
    if rms > max_rms:
        return (f"{name} has Frobenius norm {float(values.norm()):.3g} > {max_rms:g} * "
                f"sqrt({values.numel()}) (root-mean-square {rms:.3g})")
    return None


def weight_problems(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Every problem of a state dict, in key order (empty: the values are sane)."""
    return [p for k in sorted(tensors) if (p := tensor_problem(k, tensors[k])) is not None]


def fingerprint(folder: Path, names: Iterable[str]) -> tuple:
    """What a refusal of ``folder`` is keyed by: (name, size, mtime, ctime, inode) of each
    file, None for a missing one. Any write, replacement or ``touch`` changes it (ctime
    cannot be set back), so a repaired version is verified again; an untouched refused
    one is not re-hashed on every poll."""
    out = []
    for name in names:
        try:
            st = os.stat(folder / name)
        except OSError:
            out.append((name, None))
            continue
        out.append((name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return tuple(out)
