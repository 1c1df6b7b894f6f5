"""Loaded adapter versions over one base model: pinning, reference counts, forward routing.

A request pins one version for its whole life (``acquire``/``release``); the engine asks
``forward_kwargs`` before each forward so every row of a mixed batch runs with its own
version (PEFT's mixed-adapter batches). ``BASE`` is the base model with no adapter.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BASE = "base"
_PEFT_BASE = "__base__"
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class UnknownAdapter(KeyError):
    """The requested adapter version is not loaded."""


class AdapterManager:
    """Versions loaded on the engine's model; thread-safe bookkeeping."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._lock = threading.Lock()
        self._paths: dict[str, Path] = {}
        self._refs: dict[str, int] = {BASE: 0}
        self._current = BASE
        self._active: str | None = None

    @property
    def current(self) -> str:
        return self._current

    def loaded(self) -> list[str]:
        with self._lock:
            return [BASE, *self._paths]

    def load(self, version: str, path: str | Path) -> None:
        """Load a PEFT adapter directory as ``version`` (call between forwards)."""
        if not VERSION_RE.match(version) or version == BASE:
            raise ValueError(f"invalid adapter version name {version!r}")
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(path), adapter_name=version, is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=version,
                                                   is_trainable=False)
        self.model.eval()
        with self._lock:
            self._paths[version] = Path(path)
            self._refs[version] = 0
        log.info("loaded adapter %s from %s", version, path)

    def set_current(self, version: str) -> None:
        with self._lock:
            if version not in self._refs:
                raise UnknownAdapter(version)
            self._current = version

    def acquire(self, version: str | None) -> str:
        """Pin a request to ``version`` (None = current); returns the pinned name."""
        with self._lock:
            name = version or self._current
            if name not in self._refs:
                raise UnknownAdapter(name)
            self._refs[name] += 1
            return name

    def release(self, version: str) -> None:
        with self._lock:
            self._refs[version] -= 1

    def forward_kwargs(self, versions: list[str]) -> dict:
        """Extra model kwargs so row i runs with ``versions[i]`` (engine thread only)."""
        distinct = set(versions)
        if distinct == {BASE} and not self._paths:
            return {}
        if len(distinct) == 1 and BASE not in distinct:
            (name,) = distinct
            if self._active != name:
                self.model.set_adapter(name)
                self._active = name
            return {}
        return {"adapter_names": [_PEFT_BASE if v == BASE else v for v in versions]}
