"""Smoke test of `rlhf bench serving` on the tiny model.

Marked ``bench``, so CI (addopts ``-m 'not bench'``) skips it; run it with
``pytest -m bench tests/test_bench_smoke.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.cli import main


@pytest.mark.bench
@pytest.mark.timeout(600)
def test_bench_serving_reports_every_field(tiny_model_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    rc = main(["serving", "--model", str(tiny_model_dir), "--concurrency", "1,4",
               "--requests-per-level", "4", "--max-new-tokens", "16", "--out", str(out)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)  # stdout is exactly one JSON document
    assert report == json.loads(out.read_text())
    assert report["mode"] == "grpc"
    assert {"cpu_count", "torch", "torch_threads"} <= report["machine"].keys()
    assert report["model"]["parameters"] > 0 and report["model"]["context_length"] > 0
    assert {"tokens_per_s", "ttft_ms", "itl_ms"} <= report["definitions"].keys()
    base = report["baseline_sequential"]
    assert base["requests"] == 4 and base["tokens_per_s"] > 0
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 4]
    for lv in report["levels"]:
        assert lv["errors"] == 0, lv["error_examples"]
        assert lv["requests"] == 4 and lv["tokens"] > 0 and lv["tokens_per_s"] > 0
        assert lv["ttft_ms"]["p50"] is not None and lv["ttft_ms"]["p95"] >= lv["ttft_ms"]["p50"]
        assert {"p50", "p95"} <= lv["itl_ms"].keys()
        assert lv["speedup_vs_sequential"] > 0
    targets = report["targets"]
    assert targets["tokens_per_s_32_vs_sequential"]["target"] == 5.0
    assert targets["ttft_p95_ms_at_8"]["target"] == 250
