"""Smoke test of `rlhf bench feedback` on the tiny model, briefly.

Marked ``bench``, so CI (addopts ``-m 'not bench'``) skips it; run it with
``pytest -m bench tests/test_feedback_bench_smoke.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.cli import main


@pytest.mark.bench
@pytest.mark.timeout(300)
def test_bench_feedback_reports_every_field(tiny_model_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    out = tmp_path / "bench.json"
    rc = main(["feedback", "--model", str(tiny_model_dir), "--concurrency", "4",
               "--seconds", "2", "--labelers", "2", "--labeler-seconds", "3",
               "--max-new-tokens", "8", "--out", str(out)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)  # stdout is exactly one JSON document
    assert report == json.loads(out.read_text())
    assert report["redis"] == {"appendonly": "yes", "appendfsync": "everysec"}
    assert len(report["machine"]["loadavg_start"]) == 3
    submit = report["submit"]
    assert submit["errors"] == 0, submit["error_codes"]
    assert submit["accepted"] > 0 and submit["duplicates"] == 0
    assert submit["comparisons_per_s"] > 0 and submit["latency_ms"]["p95"] is not None
    assert submit["stream_check"]["ok"], submit["stream_check"]
    labelers = report["labelers"]
    assert labelers["errors"] == 0, labelers["error_examples"]
    assert labelers["turns"] > 0 and labelers["stored"] == labelers["turns"]
    assert labelers["stream_check"]["ok"], labelers["stream_check"]
    assert report["targets"]["comparisons_per_s"]["target"] == 2000
    assert report["targets"]["labeler_errors"]["met"]
