"""The learner's LoRA adapters on its one shared base: how each is configured, added, copied
and snapshotted ("rm", "policy", "sft" and PPO's frozen reference all go through here)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def lora_config(base: nn.Module, rank: int, targets: Sequence[str] = ATTENTION) -> LoraConfig:
    """Rank ``rank``, alpha 2 x rank, no dropout, on the ``targets`` the model has (none of
    them found = PEFT's default for the architecture)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    found = [t for t in targets if t in names] or None
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=found,
                      bias="none")


def add_adapter(base: nn.Module, name: str, config: LoraConfig) -> PeftModel:
    """Add adapter ``name`` to ``base`` in place (a plain model becomes a frozen PeftModel)."""
    if isinstance(base, PeftModel):
        if name in base.peft_config:
            raise ValueError(f"the base already has an adapter named {name!r}")
        base.add_adapter(name, config)
        return base
    base.requires_grad_(False)
    return get_peft_model(base, config, adapter_name=name)


def adapter_parameters(peft: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The LoRA parameters of adapter ``name`` by parameter name."""
    return {n: p for n, p in peft.named_parameters() if f".{name}." in n}


def adapter_tensors(peft: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Detached CPU copies of adapter ``name`` (what checkpoints and snapshots hold)."""
    return {n: p.detach().cpu().clone() for n, p in adapter_parameters(peft, name).items()}


@torch.no_grad()
def load_tensors(peft: nn.Module, name: str, saved: dict[str, torch.Tensor]) -> None:
    """Put ``adapter_tensors`` output back; a different layout raises ``ValueError``."""
    params = adapter_parameters(peft, name)
    if set(params) != set(saved):
        diff = sorted(set(params) ^ set(saved))[:3]
        raise ValueError(f"adapter {name!r}: layout differs ({diff}...)")
    for key, p in params.items():
        if saved[key].shape != p.shape:
            raise ValueError(f"{key}: saved shape {tuple(saved[key].shape)}, model "
                             f"{tuple(p.shape)}")
        p.copy_(saved[key])


@torch.no_grad()
def copy_adapter(peft: nn.Module, source: str, target: str) -> None:
    """Adapter ``target`` := adapter ``source`` (same layout), e.g. the policy or the RM
    starting from the SFT weights."""
    params = adapter_parameters(peft, target)
    src = adapter_parameters(peft, source)
    for key, p in params.items():
        other = src.get(key.replace(f".{target}.", f".{source}."))
        if other is None or other.shape != p.shape:
            raise ValueError(f"adapter {target!r} cannot copy {source!r}: layouts differ at "
                             f"{key}")
        p.copy_(other)
