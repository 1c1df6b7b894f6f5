"""`rlhf bench tax`: the target's arithmetic by hand (pure, runs in CI) and a smoke run on
the tiny model (marked ``bench`` like tests/test_bench_smoke.py: ``pytest -m bench
tests/test_tax_bench.py``) checking the JSON's shape and that its summary is the arithmetic
applied to its own curves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.cli import main
from bench.kit.records import best_of_k_demonstrations
from bench.tax import ARMS, sft_speedup, tax_target, with_rise
from rlhf import preferences
from rlhf.contract import validate_demonstration
from rlhf.preferences import Item


def test_tax_target_by_hand():
    # PPO +0.30 win rate at +0.40 LM loss; ptx +0.28 (93%) at +0.10 (25%): pass
    ok = tax_target({"gain": 0.30, "rise": 0.40}, {"gain": 0.28, "rise": 0.10})
    assert ok["verdict"] == "pass" and ok["gain_ok"] and ok["rise_ok"]
    assert ok["gain_share"] == pytest.approx(0.28 / 0.30)
    assert ok["rise_share"] == pytest.approx(0.25)
    # 0.26 / 0.30 = 87% of the gain: fails on the gain alone
    low = tax_target({"gain": 0.30, "rise": 0.40}, {"gain": 0.26, "rise": 0.10})
    assert low["verdict"] == "fail" and not low["gain_ok"] and low["rise_ok"]
    # exactly 90% and exactly half pass (the target's "at least" / "at most")
    edge = tax_target({"gain": 0.5, "rise": 0.5}, {"gain": 0.45, "rise": 0.25})
    assert edge["gain_ok"] and edge["rise_ok"]
    # rise 0.21 > 0.40 / 2: fails on the tax
    taxed = tax_target({"gain": 0.30, "rise": 0.40}, {"gain": 0.30, "rise": 0.21})
    assert taxed["verdict"] == "fail" and taxed["gain_ok"] and not taxed["rise_ok"]
    # PPO gained nothing: nothing to keep 90% of
    flat = tax_target({"gain": 0.0, "rise": 0.40}, {"gain": 0.1, "rise": 0.0})
    assert flat["verdict"] == "fail" and flat["gain_share"] is None
    # PPO's loss fell (no tax to halve): ptx passes when its loss does not rise either
    assert tax_target({"gain": 0.3, "rise": -0.1}, {"gain": 0.3, "rise": -0.5})["rise_ok"]
    fell = tax_target({"gain": 0.3, "rise": -0.1}, {"gain": 0.3, "rise": 0.01})
    assert not fell["rise_ok"] and fell["rise_share"] is None


def test_sft_speedup_and_rise_by_hand():
    s = sft_speedup([0.1, 0.2, 0.3], [0.25, 0.25, 0.28])
    assert s["sft_speeds_up"] and s["sft_gain_at_1"] == 0.25
    assert s["ptx_mean_gain"] == pytest.approx(0.2) and s["sft_mean_gain"] == pytest.approx(0.26)
    assert not sft_speedup([0.1, 0.2, 0.3], [0.0, 0.2, 0.3])["sft_speeds_up"]
    curve = with_rise([{"iteration": 0, "ptx_loss": None}, {"iteration": 1, "ptx_loss": 3.5},
                       {"iteration": 2, "ptx_loss": None}], 3.25)
    assert [p["lm_loss_rise"] for p in curve] == [0.0, 0.25, None]
    assert curve[0]["ptx_loss"] == 3.25


def test_best_of_k_demonstrations_are_valid_and_the_preferred_sample():
    items = [Item("Say hi."), Item("Say bye."), Item("Nothing.")]
    samples = [["hello there my friend", "hi", "hey you"], ["bye bye", "see you later"],
               ["", "  "]]
    demos = best_of_k_demonstrations(items, samples, 2, 0, preferences.get("concise"))
    assert [d.answer for d in demos] == ["hi", "bye bye"]  # a tie (2 words each): the first
    assert [d.labeler_id for d in demos] == ["sim-0", "sim-1"]
    for d in demos:
        validate_demonstration(d)
        assert d.messages[-1].content in {"Say hi.", "Say bye."}


@pytest.mark.bench
@pytest.mark.timeout(600)
def test_bench_tax_smoke(tiny_model_dir: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "tax.png"
    rc = main(["tax", "--model", str(tiny_model_dir), "--iterations", "1",
               "--tasks-per-iteration", "8", "--k", "2", "--labelers", "2", "--eval-tasks", "8",
               "--demonstrations", "6", "--demo-k", "2", "--ppo-steps", "1",
               "--ppo-batch-size", "4", "--ppo-minibatch-size", "4", "--ppo-epochs", "1",
               "--rm-epochs", "1", "--sft-epochs", "1", "--eval-prompts", "2",
               "--ptx-eval-texts", "2", "--prompts-per-iteration", "8", "--png", str(png)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)  # stdout is exactly one JSON document
    assert png.stat().st_size > 0 and report["png"] == str(png.resolve())
    arms = report["arms"]
    assert list(arms) == list(ARMS)
    assert [a["ptx_coef"] for a in arms.values()] == [0.0, 0.3, 0.3]  # 0.3 = shipped
    assert report["learner"]["ptx_corpus"].endswith("factbook-prose.jsonl")
    for name, arm in arms.items():
        curve = arm["curve"]
        assert [p["iteration"] for p in curve] == [0, 1]
        assert curve[0]["lm_loss_rise"] == 0.0
        assert curve[1]["lm_loss_rise"] == pytest.approx(
            curve[1]["ptx_loss"] - report["base_lm_loss"], abs=1e-4)
        assert curve[1]["sft_ran"] is (name == "sft_ppo_ptx"), name
    assert arms["sft_ppo_ptx"]["curve"][1]["comparisons"] == 8
    summary = report["summary"]
    end = summary["end"]
    for name, arm in arms.items():
        c = arm["curve"]
        assert end[name]["gain"] == pytest.approx(c[1]["win_rate"] - c[0]["win_rate"])
        assert end[name]["rise"] == c[1]["lm_loss_rise"]
    assert summary["target"] == tax_target(end["ppo"], end["ppo_ptx"])
    assert summary["target"]["verdict"] in ("pass", "fail")
    assert summary["sft"] == sft_speedup([end["ppo_ptx"]["gain"]], [end["sft_ppo_ptx"]["gain"]])
