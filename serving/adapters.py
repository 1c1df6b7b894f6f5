"""Loaded adapter versions over one base model: pinning, reference counts, forward routing.

A request pins one version for its whole life (``acquire``/``release``); the engine asks
``forward_kwargs`` before each forward so every row of a mixed batch runs with its own
version (PEFT's mixed-adapter batches). ``BASE`` is the base model with no adapter.

Loading is load -> validate -> canary: files that do not parse, tensors that do not fit
the model, non-finite or exploded weights, and a failed canary generation
(serving/canary.py) all raise ``AdapterRejected`` and leave nothing loaded.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rlhf.adapter_store import CONFIG_FILE, WEIGHTS_FILE, AdapterRejected, check_weights
from rlhf.contract import is_version_name
from serving.canary import canary_problem, greedy_probe

log = logging.getLogger(__name__)

BASE = "base"
_PEFT_BASE = "__base__"
_LORA_KEY_RE = re.compile(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")


class UnknownAdapter(KeyError):
    """The requested adapter version is not loaded."""


@dataclass(frozen=True)
class FollowState:
    """This replica against the registry: what it says is current, what is served."""

    registry_current: str | None
    serving: str
    refused_reason: str = ""  # why registry_current is refused here ("" = it is not)

    @property
    def degraded(self) -> bool:
        return self.registry_current is not None and self.serving != self.registry_current

    def describe(self) -> dict:
        detail = ""
        if self.degraded:
            detail = (f"degraded: registry current {self.registry_current} refused "
                      f"({self.refused_reason or 'not loaded yet'}), serving {self.serving}")
        return {**asdict(self), "degraded": self.degraded, "detail": detail}


class AdapterManager:
    """Versions loaded on the engine's model; thread-safe bookkeeping."""

    def __init__(self, model: torch.nn.Module, keep_versions: int = 3,
                 canary_prompt_ids: Sequence[int] | None = None) -> None:
        self.model = model
        self.keep_versions = keep_versions
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 32)
        # Without a tokenizer (tests, tools) any in-vocabulary ids make a fixed prompt.
        self.canary_prompt_ids = list(canary_prompt_ids or
                                      [(7 * i + 3) % vocab for i in range(12)])
        self._base_canary: list[int] | None = None
        self.follow_state: FollowState | None = None  # set by a RegistryFollower
        self._lock = threading.Lock()
        self._paths: dict[str, Path] = {}
        self._refs: dict[str, int] = {BASE: 0}
        self._current = BASE
        self._active: str | None = None
        self._known: set[str] = set()
        # (in_features, out_features) of every Linear of the base model, taken before PEFT
        # wraps it, so an adapter's shapes can be checked off the engine thread.
        self._linear_shapes = {name: (m.in_features, m.out_features)
                               for name, m in model.named_modules()
                               if hasattr(m, "in_features") and hasattr(m, "out_features")}

    @property
    def current(self) -> str:
        return self._current

    def loaded(self) -> list[str]:
        with self._lock:
            return [BASE, *self._paths]

    def known(self) -> set[str]:
        """Loaded versions plus every version the registry has told us about."""
        with self._lock:
            return {BASE, *self._paths, *self._known}

    def note_known(self, versions: list[str]) -> None:
        with self._lock:
            self._known.update(versions)

    def check_shapes(self, path: str | Path) -> None:
        """Raise AdapterRejected unless every LoRA tensor fits its base model module."""
        from safetensors import safe_open

        path = Path(path)
        try:
            json.loads((path / CONFIG_FILE).read_text())
            with safe_open(str(path / WEIGHTS_FILE), framework="pt") as fh:
                shapes = {k: fh.get_slice(k).get_shape() for k in fh.keys()}  # noqa: SIM118
        except Exception as exc:  # SafetensorError, OSError, JSON: the files do not parse
            raise AdapterRejected("load_error", f"{path}: {type(exc).__name__}: {exc}") \
                from None
        for key, shape in shapes.items():
            _check_lora_tensor(key, shape, self._linear_shapes)

    def check_files(self, path: str | Path) -> None:
        """Shapes and weight values; raises AdapterRejected (any thread)."""
        self.check_shapes(path)
        check_weights(Path(path))

    def load(self, version: str, path: str | Path, *, checked: bool = False) -> None:
        """Load a PEFT adapter directory as ``version`` and run the canary (call between
        forwards; ``checked``: ``check_files`` already passed off the engine thread).

        Raises AdapterRejected when the files do not parse or fit the model, the weights
        are not sane, PEFT refuses them or the canary fails; nothing stays loaded then.
        """
        if not is_version_name(version) or version == BASE:
            raise ValueError(f"invalid adapter version name {version!r}")
        from peft import PeftModel

        if not checked:
            self.check_files(path)
        if self._base_canary is None:
            self._base_canary = self._probe(BASE)[0]
        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(path), adapter_name=version, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path),
                                                       adapter_name=version,
                                                       is_trainable=False)
        except Exception as exc:
            self._forget_peft(version)
            raise AdapterRejected("load_error", f"PEFT could not load {version}: "
                                  f"{type(exc).__name__}: {exc}") from None
        self.model.eval()
        self._active = None  # loading may change PEFT's active adapter: set it again
        try:
            problem = canary_problem(*self._probe(version), self._base_canary)
        except Exception as exc:  # e.g. a forward that raises with these weights
            problem = f"the canary forward failed: {type(exc).__name__}: {exc}"
        if problem is not None:
            self._forget_peft(version)
            raise AdapterRejected("canary", f"{version}: {problem}")
        with self._lock:
            self._paths[version] = Path(path)
            self._refs[version] = 0
        log.info("loaded adapter %s from %s", version, path)

    def _probe(self, version: str) -> tuple[list[int], bool]:
        """Greedy canary tokens with ``version`` (engine thread, or before it starts)."""
        from peft import PeftModel

        if version == BASE:
            if isinstance(self.model, PeftModel):
                with self.model.disable_adapter():
                    return greedy_probe(self.model, self.canary_prompt_ids)
            return greedy_probe(self.model, self.canary_prompt_ids)
        self.model.set_adapter(version)
        self._active = version
        return greedy_probe(self.model, self.canary_prompt_ids)

    def _forget_peft(self, version: str) -> None:
        peft_config = getattr(self.model, "peft_config", {})
        if version in peft_config:
            try:
                self.model.delete_adapter(version)
            except Exception:  # a half-loaded adapter; nothing routes to it
                log.exception("could not remove the half-loaded adapter %s", version)
            if not self.model.peft_config:
                # A PeftModel without adapters cannot run forward: back to the bare model.
                self.model = self.model.unload()
        self._active = None

    def unload(self, version: str) -> bool:
        """Remove ``version`` if no request holds it and it is not current (engine thread)."""
        with self._lock:
            if (version == BASE or version == self._current or version not in self._paths
                    or self._refs.get(version, 0) > 0):
                return False
            del self._paths[version], self._refs[version]
        self.model.delete_adapter(version)
        self._active = None
        log.info("unloaded adapter %s", version)
        return True

    def evict(self) -> list[str]:
        """Unload free versions beyond the ``keep_versions`` most recently loaded."""
        with self._lock:
            names = list(self._paths)  # load order
        keep = set(names[-self.keep_versions:]) if self.keep_versions > 0 else set()
        return [v for v in names if v not in keep and self.unload(v)]

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


def _check_lora_tensor(key: str, shape: list[int],
                       linear_shapes: dict[str, tuple[int, int]]) -> None:
    """``base_model.model.<module>.lora_A.weight`` is [r, in]; ``lora_B`` is [out, r]."""
    match = _LORA_KEY_RE.fullmatch(key)
    if match is None:
        return  # embeddings, biases, modules_to_save: PEFT itself checks those
    module, which = match.groups()
    if module not in linear_shapes:
        raise AdapterRejected("shape", f"{key}: the base model has no module {module!r}")
    in_features, out_features = linear_shapes[module]
    got = shape[1] if which == "A" else shape[0]
    want = in_features if which == "A" else out_features
    if len(shape) != 2 or got != want:
        raise AdapterRejected("shape", f"{key} has shape {list(shape)}; {module} needs "
                              f"{'in' if which == 'A' else 'out'}_features {want}")
