"""What a restarted learner needs to continue the same policy (docs/design.md §5), and the startup
sweep of files a killed learner can leave behind.

Layout: ``DATA/checkpoint/<sequence>-<version>/`` holds ``state.pt`` (policy LoRA tensors by
parameter name, value head, Adam state, KL controller, PPO step; and ``reference``: the frozen
SFT adapter PPO's KL is measured to, when there is one) and ``manifest.json``,
written last (version = the adapter these weights were published as, i.e. the parent of
the next one; base model; sha256 of state.pt). A save writes a ``.tmp-*`` folder, fsyncs,
renames it into place, writes the manifest, then deletes older checkpoints: a kill at any
point leaves the previous complete checkpoint or the new one, never half of one. A folder
without a manifest is incomplete and ignored (and swept). Nothing here knows the phases.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis
import torch

from learner.kl_control import AdaptiveKL
from learner.ppo import POLICY, PPOState
from rlhf import adapter_store
from rlhf.adapter_store import fsync_path

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint this learner cannot continue from (other base, other shapes, damaged)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """``manifest.json``: which published version the saved policy is, and on what base."""

    sequence: int  # increases with every save into this data dir
    version: str  # the adapter version these weights were published as
    parent: str | None  # that version's parent
    base_model: str
    ppo_step: int
    kl_kind: str  # FixedKL | AdaptiveKL
    lora_rank: int
    sha256: str  # of state.pt
    created_at: float
    reference: str = "base"  # the KL reference: "base" (every adapter off) or "sft"
    ppo: bool = True  # False: only the reference (``rlhf sft``, or SFT just reset the policy)
    sft_demonstrations: int = 0  # how many demonstrations the "sft" reference was trained on
    format: int = FORMAT


# -- state dicts -------------------------------------------------------------------------------


def policy_tensors(state: PPOState) -> dict[str, torch.Tensor]:
    """The policy LoRA by parameter name (detached CPU copies)."""
    return {n: p.detach().cpu().clone() for n, p in state.peft.named_parameters()
            if f".{POLICY}." in n}


def ppo_state_dict(state: PPOState) -> dict[str, Any]:
    return {"policy": policy_tensors(state), "value_head": state.value_head.state_dict(),
            "optimizer": state.optimizer.state_dict(), "kl_ctl": state.kl_ctl.state_dict(),
            "step": state.step}


def load_ppo_state_dict(state: PPOState, saved: dict[str, Any], kl_kind: str) -> None:
    """Put saved tensors into a fresh ``make_ppo_state`` result; the learning rate stays the
    one configured now (an operator may change it between runs); beta is restored only for an
    adaptive controller in both (a fixed beta is configuration, not state)."""
    params = {n: p for n, p in state.peft.named_parameters() if f".{POLICY}." in n}
    if set(params) != set(saved["policy"]):
        missing = sorted(set(params) ^ set(saved["policy"]))[:3]
        raise CheckpointError(f"policy LoRA layout differs from the checkpoint's ({missing}..."
                              "): was ppo_lora_rank or the model changed?")
    with torch.no_grad():
        for name, p in params.items():
            src = saved["policy"][name]
            if src.shape != p.shape:
                raise CheckpointError(f"{name}: checkpoint shape {tuple(src.shape)}, model "
                                      f"{tuple(p.shape)} (ppo_lora_rank changed?)")
            p.copy_(src)
    state.value_head.load_state_dict(saved["value_head"])
    lrs = [g["lr"] for g in state.optimizer.param_groups]
    state.optimizer.load_state_dict(saved["optimizer"])
    for group, lr in zip(state.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    if kl_kind == type(state.kl_ctl).__name__ and isinstance(state.kl_ctl, AdaptiveKL):
        state.kl_ctl.load_state_dict(saved["kl_ctl"])
    state.step = int(saved["step"])


# -- files -------------------------------------------------------------------------------------


def _complete(root: Path) -> list[tuple[CheckpointInfo, Path]]:
    """Checkpoints with a readable manifest, oldest first."""
    found = []
    for folder in root.iterdir() if root.is_dir() else ():
        if folder.name.startswith(".") or not (folder / MANIFEST_FILE).is_file():
            continue
        try:
            info = CheckpointInfo(**json.loads((folder / MANIFEST_FILE).read_text()))
        except (ValueError, TypeError) as exc:
            log.warning("ignoring checkpoint %s: unreadable manifest (%s)", folder, exc)
            continue
        found.append((info, folder))
    return sorted(found, key=lambda pair: pair[0].sequence)


def save(root: Path, state: PPOState | None, *, version: str, parent: str | None,
         base_model: str, reference: dict[str, torch.Tensor] | None = None,
         sft_demonstrations: int = 0, ppo_step: int = 0) -> CheckpointInfo:
    """Write the checkpoint of ``state`` published as ``version`` (atomic, manifest last);
    ``reference``: the SFT adapter's tensors (``learner.lora.adapter_tensors``) when PPO's
    reference is that adapter; ``state`` None: no PPO state yet (the policy starts as a
    copy of the reference and its value head from the next RM; ``ppo_step`` is the step
    counter it will go on from)."""
    if state is None and reference is None:
        raise ValueError("a checkpoint needs a PPO state or a reference adapter")
    root.mkdir(parents=True, exist_ok=True)
    previous = _complete(root)
    tmp = root / f".tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        saved = ppo_state_dict(state) if state is not None else {}
        if reference is not None:
            saved["reference"] = reference
        torch.save(saved, tmp / STATE_FILE)
        fsync_path(tmp / STATE_FILE)
        fsync_path(tmp)
        sequence = previous[-1][0].sequence + 1 if previous else 1
        final = root / f"{sequence:06d}-{version}"
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    lora = policy_tensors(state) if state is not None else reference or {}
    lora_rank = next(p for n, p in lora.items() if ".lora_A." in n).shape[0]
    info = CheckpointInfo(sequence=sequence, version=version, parent=parent,
                          base_model=base_model, ppo_step=state.step if state else ppo_step,
                          kl_kind=type(state.kl_ctl).__name__ if state else "",
                          lora_rank=int(lora_rank),
                          sha256=adapter_store.sha256_file(final / STATE_FILE),
                          created_at=time.time(),
                          reference="base" if reference is None else "sft",
                          ppo=state is not None, sft_demonstrations=sft_demonstrations)
    part = final / (MANIFEST_FILE + ".tmp")
    part.write_text(json.dumps(asdict(info), sort_keys=True))
    fsync_path(part)
    os.rename(part, final / MANIFEST_FILE)
    fsync_path(final)
    fsync_path(root)
    for _, old in previous:  # only now: until here the previous one was the latest
        shutil.rmtree(old, ignore_errors=True)
    return info


def load_latest(root: Path, base_model: str, device: torch.device | str = "cpu"
                ) -> tuple[CheckpointInfo, dict[str, Any]] | None:
    """The newest complete checkpoint, checked against ``base_model`` and its sha256; None in
    a fresh data dir. Raises ``CheckpointError`` rather than silently starting over."""
    found = _complete(root)
    if not found:
        return None
    info, folder = found[-1]
    if info.format != FORMAT:
        raise CheckpointError(f"{folder}: checkpoint format {info.format}, expected {FORMAT}")
    if info.base_model != base_model:
        raise CheckpointError(f"{folder} continues a policy on base model {info.base_model!r} "
                              f"but this learner runs {base_model!r}: use another data_dir "
                              "or move the checkpoint away to start from the base")
    if adapter_store.sha256_file(folder / STATE_FILE) != info.sha256:
        raise CheckpointError(f"{folder / STATE_FILE} does not match its manifest's sha256 "
                              "(damaged): move the checkpoint away to start from the base")
    return info, torch.load(folder / STATE_FILE, map_location=device, weights_only=True)


def sweep(root: Path) -> list[str]:
    """Delete what a killed save left (``.tmp-*``, folders without a manifest) and any
    complete checkpoint older than the newest; returns the names removed."""
    if not root.is_dir():
        return []
    keep = {folder for _, folder in _complete(root)[-1:]}
    removed = [f.name for f in root.iterdir() if f.is_dir() and f not in keep]
    for name in removed:
        shutil.rmtree(root / name, ignore_errors=True)
    return removed


def sweep_leftovers(data_dir: Path, checkpoints: str, store: str | Path,
                    registered: set[str]) -> list[str]:
    """Startup: ``sweep`` the checkpoints, drop publish's ``.publish-*`` staging folders in
    the data dir, ``sweep_store``; returns what was removed."""
    removed = sweep(data_dir / checkpoints)
    for tmp in data_dir.glob(".publish-*"):
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp.name)
    return removed + sweep_store(Path(store), registered)


def register_if_missing(client: redis.Redis, store: str | Path, version: str,
                        base_model: str) -> bool:
    """Finish a publish cut off after its checkpoint (kill, Redis error): ``version`` is
    complete in the store but not in the registry. It is made current unless an operator
    switched away from its parent meanwhile. True when it registered something."""
    if adapter_store.get_manifest(client, version) is not None:
        return False
    try:
        manifest = adapter_store.verify(store, version, base_model)
    except adapter_store.AdapterRejected as exc:
        log.error("checkpointed version %s cannot be registered: %s", version, exc)
        return False
    make_current = adapter_store.current(client) in (None, manifest.parent)
    adapter_store.register(client, manifest, make_current=make_current)
    log.warning("registered %s, whose publish a restart had interrupted (made current: %s)",
                version, make_current)
    return True


def sweep_store(store: Path, registered: set[str]) -> list[str]:
    """Remove an adapter store's leftovers of a killed publish: ``.tmp-*`` folders and
    version folders with no manifest that the registry does not list (a manifest-less
    folder is incomplete by the store's contract: docs/design.md §4). Complete versions, even
    unregistered ones, stay."""
    if not store.is_dir():
        return []
    removed = []
    for folder in store.iterdir():
        if not folder.is_dir():
            continue
        partial = not (folder / adapter_store.MANIFEST_FILE).is_file()
        if folder.name.startswith(".tmp-") or (partial and folder.name not in registered):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed
