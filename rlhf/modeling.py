"""Load a base causal LM (and its tokenizer) the way serving and the learner both need it.

Any Hugging Face causal LM by hub id or local directory goes through ``from_pretrained``;
a named model (``rlhf.models``: the built-in starter, SmolLM2) is a cached local directory.
4-bit loading uses bitsandbytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    name: str
    """What the user asked for (hub id or path), reported as the base model."""
    context_length: int
    eos_token_ids: tuple[int, ...]


def model_kind(name: str) -> str:
    """How ``--model`` is read: "named" (``rlhf models list``; empty = the starter), "path"
    (an existing directory) or "hub" (``owner/name``); UnknownModel for anything else."""
    from rlhf import models

    name = name.strip()
    if not name or name in models.REGISTRY:
        return "named"
    if Path(name).expanduser().is_dir():
        return "path"
    if "/" in name and not name.startswith(("/", "./", "../", "~")):
        return "hub"
    raise models.UnknownModel(name)


def resolve_model_name(name: str) -> str:
    """What every command's ``--model`` means, in one place: a directory or hub id for
    from_pretrained. A named model is fetched/built and verified first (its cache entry)."""
    from rlhf import models

    if model_kind(name) == "named":
        return str(models.ensure(name.strip() or "starter").path)
    return name.strip()


def display_name(name: str) -> str:
    """The base model's name as served and recorded in adapter manifests: the name given,
    except that the starter presets (empty or by name) are named by their cache directory,
    which changes whenever their recipe does."""
    from rlhf import models

    name = name.strip()
    entry = models.REGISTRY.get(name or "starter")
    if entry is not None and entry.starter_preset:
        return f"starter:{models.entry_dir(entry).name}"
    return name


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16, float16 or auto") \
            from None


def _context_length(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> int:
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return int(min(tokenizer.model_max_length, 4096))


def _eos_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return tuple(sorted(ids))


def load_model(name: str, *, device: str = "auto", dtype: str = "auto",
               load_in_4bit: bool = False) -> LoadedModel:
    """Load tokenizer and model in eval mode; ``name`` as :func:`resolve_model_name`."""
    path = resolve_model_name(name)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs: dict = {"dtype": torch_dtype}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype)
        kwargs["device_map"] = {"": str(dev)}
    log.info("loading %s (device=%s dtype=%s 4bit=%s)", path, dev, torch_dtype, load_in_4bit)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not load_in_4bit:
        model = model.to(dev)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, name=display_name(name),
                       context_length=_context_length(model, tokenizer),
                       eos_token_ids=_eos_ids(model, tokenizer))
