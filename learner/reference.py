"""PPO's KL reference and the SFT adapter behind it (docs/design.md §3, §5).

Until the first SFT the reference is the base with every adapter off (``adapter`` None);
afterwards it is the frozen "sft" LoRA on the shared base, which is also where the policy
restarts and the RM's LoRA starts each iteration. ``Reference`` owns that adapter's life:
trained again (fresh init, all demonstrations) only when there is something new, restored
from the checkpoint at startup, rolled back when a retrain fails, so the reference never
changes half-way and a restarted learner keeps the same one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from peft import LoraConfig
from torch import nn

from learner import distributed as dd
from learner.checkpoint import CheckpointError
from learner.lora import (
    adapter_parameters,
    adapter_tensors,
    add_adapter,
    copy_adapter,
    load_tensors,
)
from learner.records import pause_for_tests
from learner.sft import SFT, SFTConfig, StepCallback, fit_sft
from rlhf.v1.feedback_pb2 import Demonstration

log = logging.getLogger(__name__)


class Reference:
    """The SFT reference on ``peft``; ``layout()`` gives its LoRA config (the RM's)."""

    def __init__(self, peft: nn.Module, layout: Callable[[], LoraConfig]) -> None:
        self.peft, self.layout = peft, layout
        self.adapter: str | None = None  # "sft" once trained
        self.demonstrations = 0  # how many demonstrations it learned from

    def due(self, demonstrations: Sequence[Demonstration], new: int) -> bool:
        """Train (again)? When new demonstrations arrived, or more are stored than the
        current adapter learned from (a kill or failure after a drain lost that SFT)."""
        return bool(demonstrations) and (new > 0 or len(demonstrations) > self.demonstrations)

    def train(self, tokenizer, demonstrations: Sequence[Demonstration], cfg: SFTConfig,
              on_step: StepCallback | None = None) -> dict:
        """``fit_sft`` on all ``demonstrations``; on any failure the previous adapter (or
        none) is put back before re-raising."""
        before = adapter_tensors(self.peft, SFT) if self.adapter is not None else None
        try:
            metrics = fit_sft(self.peft, tokenizer, demonstrations, cfg, self.layout(),
                              on_step=on_step)
            with torch.no_grad():  # a cluster: every rank trained alike; rank 0's, exactly
                dd.broadcast_params(list(adapter_parameters(self.peft, SFT).values()))
            pause_for_tests("sft:trained")
        except BaseException:
            if before is not None:
                load_tensors(self.peft, SFT, before)
            elif SFT in self.peft.peft_config:
                self.peft.set_adapter(next(n for n in self.peft.peft_config if n != SFT))
                self.peft.delete_adapter(SFT)
            raise
        self.adapter, self.demonstrations = SFT, len(demonstrations)
        return metrics

    def restore(self, saved: dict[str, torch.Tensor] | None, demonstrations: int) -> None:
        """Startup: the checkpoint's SFT tensors become the reference again."""
        add_adapter(self.peft, SFT, self.layout())
        try:
            if saved is None:
                raise KeyError("no reference tensors in state.pt")
            load_tensors(self.peft, SFT, saved)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"the checkpoint's SFT reference does not fit this learner "
                                  f"(rm_lora_rank or the model changed?): {exc}") from None
        self.adapter, self.demonstrations = SFT, demonstrations

    def tensors(self) -> dict[str, torch.Tensor] | None:
        """What the checkpoint keeps (None: the reference is the base)."""
        return adapter_tensors(self.peft, SFT) if self.adapter is not None else None

    def start(self, target: str) -> None:
        """Adapter ``target`` (the RM's, with the same layout) := the SFT weights; no-op
        while the reference is the base."""
        if self.adapter is not None:
            copy_adapter(self.peft, self.adapter, target)
