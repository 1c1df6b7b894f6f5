"""The one publish path (docs/design.md §4, §5): an iteration's publish phase and `rlhf sft`
both publish through ``publish_version``.

Store files (manifest last) -> checkpoint -> registry: a kill before the checkpoint leaves an
unregistered, unused version (its number is never reused); a kill after it is finished by
``checkpoint.register_if_missing`` at the next start, so checkpoint and registry agree.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import torch
from torch import nn

from learner import checkpoint
from learner.ppo import PPOState
from learner.records import pause_for_tests
from rlhf import adapter_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Release:
    """What to publish: adapter ``adapter`` of ``peft`` as the served weights, and what the
    checkpoint keeps for a restart (``ppo`` may be None, ``reference`` the SFT tensors)."""

    peft: nn.Module
    adapter: str
    ppo: PPOState | None
    reference: dict[str, torch.Tensor] | None
    sft_demonstrations: int
    ppo_step: int  # the PPO step counter (when ``ppo`` is None: the one it goes on from)
    metrics: dict[str, Any]
    config: dict[str, Any]


def publish_version(client: redis.Redis, store: str | Path, data_dir: Path, checkpoints: str,
                    release: Release, *, parent: str | None, base_model: str,
                    on_checkpointed: Callable[[str], None] = lambda version: None
                    ) -> adapter_store.Manifest:
    """Publish ``release`` as the next version, made current; returns its manifest.
    ``on_checkpointed(version)`` runs once the checkpoint holds it (before the registry
    write, which a restart finishes if it fails): from then on it is the parent."""
    if parent is not None:  # a registration that failed last time
        checkpoint.register_if_missing(client, store, parent, base_model)
    store = Path(store)
    version = adapter_store.next_version(client)
    while (store / version).exists():  # e.g. a registry reset under an old store
        version = adapter_store.next_version(client)
    metrics = {k: v for k, v in release.metrics.items() if isinstance(v, (int, float))}
    with tempfile.TemporaryDirectory(prefix=".publish-", dir=data_dir) as tmp:
        release.peft.save_pretrained(tmp, selected_adapters=[release.adapter])
        folder = Path(tmp) / release.adapter  # PEFT nests a non-default adapter's files
        manifest = adapter_store.publish(
            store, version, folder if folder.is_dir() else Path(tmp), parent=parent,
            base_model=base_model, metrics=metrics, config=release.config)
    pause_for_tests("publish:stored")
    checkpoint.save(data_dir / checkpoints, release.ppo, version=version, parent=parent,
                    base_model=base_model, reference=release.reference,
                    sft_demonstrations=release.sft_demonstrations, ppo_step=release.ppo_step)
    on_checkpointed(version)
    pause_for_tests("publish:checkpointed")
    adapter_store.register(client, manifest, make_current=True)
    log.info("published %s (parent %s, adapter %r)", version, parent, release.adapter)
    return manifest
