"""Adapter versions a replica must refuse and how refusals heal (issue #12 findings 2, 4, 8;
docs/design.md §4). Real Redis (db 3), a real `rlhf serve` process, the tiny model, PEFT
adapters; bad versions come from tests/adapter_kit.py."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from rlhf import adapter_store as store
from rlhf.adapter_checks import config_problem, tensor_problem, weight_problems
from rlhf.adapter_store import AdapterRejected
from rlhf.modeling import load_model
from serving.adapters import AdapterManager
from serving.canary import canary_problem, greedy_probe
from tests.adapter_kit import (
    broken_safetensors,
    cli,
    current,
    log_lines,
    make_env,
    rejected,
    rejected_any,
    scale_weights,
    store_unchecked,
    wait_for,
)
from tests.test_hot_swap import _corrupt, _wrong_shapes, greedy, wait_live


@pytest.fixture(scope="module")
def env(tiny_model_dir, redis_server, tmp_path_factory) -> Iterator[dict]:
    yield from make_env(tiny_model_dir, redis_server.db_url(3),
                        tmp_path_factory.mktemp("adapter-store"))


# -- finding 2: a refused version is retried once repaired, and on promote -------------


def test_a_repaired_version_goes_live_and_a_promote_always_rechecks(env, tmp_path):
    server, stub, maker = env["server"], env["stub"], env["maker"]
    good = current(stub)
    fixed = maker.publish(seed=30, register=False)
    weights = env["store"] / fixed.version / store.WEIGHTS_FILE
    original = weights.read_bytes()
    _corrupt(env["store"] / fixed.version)
    store.register(env["client"], fixed)
    wait_for(lambda: (fixed.version, "checksum") in rejected(server), 10, "checksum refusal")
    time.sleep(1.5)  # five polls: still refused, logged and counted once
    assert current(stub) == good
    assert rejected(server)[(fixed.version, "checksum")] == 1.0
    assert len(log_lines(server, f"adapter {fixed.version} refused (checksum")) == 1

    weights.write_bytes(original)  # the operator repairs the file, then promotes it
    started = time.monotonic()
    out = cli(env, "promote", fixed.version, store_dir=str(env["store"]))
    assert out.returncode == 0, out.stderr
    wait_live([stub], fixed.version, started, limit=15)
    assert greedy(stub, tokens=2)[1] == {fixed.version}
    assert log_lines(server, f"adapter {fixed.version} changed in the store") or \
        log_lines(server, f"adapter {fixed.version} was announced current")

    # A refusal the CLI cannot see (shapes need the model): promoting it again makes the
    # replica check it again and say so; it stays refused, counted once, old one serving.
    shaped = store_unchecked(env, 31, _wrong_shapes, tmp_path)
    wait_for(lambda: (shaped.version, "shape") in rejected(server), 10, "shape refusal")
    out = cli(env, "promote", shaped.version, store_dir=str(env["store"]))
    assert out.returncode == 0, out.stderr
    wait_for(lambda: log_lines(server, f"adapter {shaped.version} is still refused (shape)"),
             10, "a re-check after promote")
    assert log_lines(server, f"adapter {shaped.version} was announced current")
    assert rejected(server)[(shaped.version, "shape")] == 1.0
    assert current(stub) == fixed.version


# -- finding 8: unparseable files with valid checksums --------------------------------


def test_broken_safetensors_with_a_valid_checksum_is_refused_and_logged_once(env, tmp_path):
    server, stub = env["server"], env["stub"]
    good = current(stub)
    broken = store_unchecked(env, 40, broken_safetensors, tmp_path)
    with pytest.raises(AdapterRejected, match="load_error"):  # checksums match: only parsing
        store.verify(env["store"], broken.version, env["maker"].base)  # the file catches it
    wait_for(lambda: (broken.version, "load_error") in rejected(server), 10, "load_error")
    time.sleep(1.5)  # five polls
    assert rejected(server)[(broken.version, "load_error")] == 1.0
    lines = log_lines(server, f"adapter {broken.version} refused (load_error)")
    assert len(lines) == 1, lines
    assert not log_lines(server, "Traceback"), "".join(server.stderr_lines[-30:])
    assert current(stub) == good
    assert greedy(stub, tokens=2)[1] == {good}
    # The CLI refuses to promote it, for the same reason.
    out = cli(env, "promote", broken.version, store_dir=str(env["store"]))
    assert out.returncode == 1 and "load_error" in out.stderr


def test_a_registry_entry_cannot_point_outside_the_store(env):
    """A version name is a directory of the store: "../x" is refused (reason "name",
    counted, no traceback) even when the files it points at would verify."""
    server, stub = env["server"], env["stub"]
    good = current(stub)
    outside = env["store"].parent / "outside"
    shutil.copytree(env["store"] / good, outside)
    manifest = store.Manifest.from_json((outside / store.MANIFEST_FILE).read_text())
    manifest = store.Manifest(**{**manifest.__dict__, "version": "../outside"})
    (outside / store.MANIFEST_FILE).write_text(manifest.to_json())
    store.register(env["client"], manifest)
    wait_for(lambda: ("../outside", "name") in rejected_any(server), 10, "name refusal")
    assert current(stub) == good
    assert not log_lines(server, "Traceback"), "".join(server.stderr_lines[-30:])



# -- finding 4: NaN and exploded weights; the canary -----------------------------------


def test_nan_and_huge_weights_are_never_published_nor_served(env, tmp_path):
    server, stub, maker = env["server"], env["stub"], env["maker"]
    good = current(stub)
    text_before, _ = greedy(stub)
    nan = store_unchecked(env, 50, scale_weights(1.0, float("nan")), tmp_path)
    huge = store_unchecked(env, 51, scale_weights(1e4), tmp_path)
    amplified = store_unchecked(env, 54, set_alpha(1e4), tmp_path)  # sane weights, x1250
    for version in (nan.version, huge.version, amplified.version):
        wait_for(lambda v=version: (v, "values") in rejected(server), 10, f"{version} refused")
    assert current(stub) == good
    assert greedy(stub) == (text_before, {good}), "the good version still answers the same"
    out = cli(env, "promote", nan.version, store_dir=str(env["store"]))
    assert out.returncode == 1 and "non-finite" in out.stderr

    # The learner's publish path (the shared store) refuses them and leaves nothing.
    for seed, value, factor in ((52, float("inf"), 1.0), (53, None, 1e4)):
        maker.randomize(seed)
        with torch.no_grad():
            p = next(p for n, p in maker.peft.named_parameters() if "lora_B" in n)
            p.mul_(factor)
            if value is not None:
                p[0, 0] = value
        with pytest.raises(AdapterRejected) as caught:
            store.publish(env["store"], f"refused-{seed}", maker.peft, parent=good,
                          base_model=maker.base)
        assert caught.value.reason == "values"
        assert not (env["store"] / f"refused-{seed}").exists()
        assert not [p for p in env["store"].iterdir() if p.name.startswith(".tmp-")]


def set_alpha(alpha: float) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        path = folder / store.CONFIG_FILE
        path.write_text(json.dumps({**json.loads(path.read_text()), "lora_alpha": alpha}))
    return mutate


def test_the_canary_refuses_weights_that_wreck_generation(env, tmp_path):
    """Weights that slip past the static checks (here: skipped) still never go live."""
    maker = env["maker"]
    manager = AdapterManager(load_model(maker.base).model, keep_versions=2)
    base_tokens = greedy_probe(manager.model, manager.canary_prompt_ids)
    src = tmp_path / "nan"
    src.mkdir()
    maker.randomize(60)
    maker.peft.save_pretrained(src)
    scale_weights(1.0, float("nan"))(src)
    with pytest.raises(AdapterRejected) as caught:
        manager.load("nan", src, checked=True)
    assert caught.value.reason == "canary" and "non-finite" in caught.value.detail
    assert manager.loaded() == ["base"]
    assert greedy_probe(manager.model, manager.canary_prompt_ids) == base_tokens, \
        "after a refusal the base model still runs, unchanged"
    with pytest.raises(AdapterRejected, match="values"):
        manager.load("nan", src)  # unchecked: the value check comes first
    manager.load("v1", env["store"] / "v1")  # a good one still loads beside base
    manager.set_current("v1")
    assert manager.loaded() == ["base", "v1"]


def test_value_and_canary_rules_by_hand():
    assert tensor_problem("a", torch.tensor([0.5, -1.0])) is None
    assert "non-finite" in tensor_problem("a", torch.tensor([0.0, float("nan")]))
    assert "non-finite" in tensor_problem("a", torch.tensor([float("-inf")]))
    assert "|value| 17" in tensor_problem("a", torch.tensor([17.0, 0.0]))
    # max-abs 8 passes, root-mean-square 8 > 4 does not
    assert "Frobenius" in tensor_problem("a", torch.full((4, 4), 8.0))
    assert tensor_problem("ids", torch.tensor([10**6])) is None  # not float weights
    assert weight_problems({"b": torch.ones(2), "a": torch.tensor([float("nan")])}) == [
        "a has 1 non-finite value(s) (NaN/inf)"]
    assert config_problem({"r": 8, "lora_alpha": 16}) is None
    assert config_problem({"r": 16, "lora_alpha": 64, "use_rslora": True}) is None  # 64/4
    assert "scale lora_alpha/r = 1.25e+03" in config_problem({"r": 8, "lora_alpha": 1e4})
    assert "positive integer" in config_problem({"r": 0, "lora_alpha": 16})
    assert "positive number" in config_problem({"r": 8, "lora_alpha": float("nan")})
    assert "JSON object" in config_problem([])
    assert canary_problem([3, 4, 5], True, [1, 2, 3]) is None
    assert "non-finite" in canary_problem([3], False, [1, 2, 3])
    assert "degenerate" in canary_problem([9, 9, 9], True, [1, 2, 3])
    assert canary_problem([9, 9, 9], True, [7, 7, 7]) is None  # the base repeats too
