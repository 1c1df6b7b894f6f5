"""`rlhf bench serving --against none`: the side-by-side benchmark's JSON, our server only
(the vLLM side needs .venv-vllm; `--against vllm` is run by hand, see the README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.cli import main


@pytest.mark.timeout(300)
def test_side_by_side_bench_reports_every_level_with_exact_token_counts(
        tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    rc = main(["serving", "--against", "none", "--model", str(tiny_model_dir),
               "--threads", "1", "--concurrency", "1,2", "--n4-concurrency", "2",
               "--seconds-per-level", "0", "--max-tokens", "8", "--out", str(out)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)  # stdout is exactly one JSON document
    assert report == json.loads(out.read_text())
    assert report["against"] == "none" and "ours" in report["commands"]
    assert {"tokens_per_s", "ttft_ms", "itl_ms", "tpot_ms", "ratio"} <= \
        report["definitions"].keys()
    levels = [(lv["shape"], lv["concurrency"]) for lv in report["levels"]]
    assert levels == [("fixed", 1), ("fixed", 2), ("natural", 1), ("natural", 2), ("n4", 2)]
    for lv in report["levels"]:
        ours = lv["ours"]
        assert ours["errors"] == 0, ours["error_examples"]
        assert ours["requests"] == lv["concurrency"]  # one request per stream
        assert ours["tokens_per_s"] > 0 and ours["ttft_ms"]["p95"] >= ours["ttft_ms"]["p50"]
        assert "ratio" not in lv  # nothing to divide by
        if lv["shape"] != "natural":  # fixed length: EOS ignored, every choice 8 tokens
            assert ours["tokens"] == 8 * lv["n"] * ours["requests"]
            assert ours["mean_completion_tokens"] == 8
    assert report["targets"]["tokens_per_s_ratio_fixed_32"]["met"] is False
