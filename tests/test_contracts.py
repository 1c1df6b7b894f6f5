"""The house rules: generated stubs are fresh, and the processes keep to their own imports."""

from __future__ import annotations

import ast
from pathlib import Path

from rlhf.codegen import generate

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_match_proto_sources(tmp_path):
    fresh = generate(tmp_path)
    assert fresh, "no proto files found"
    for path in fresh:
        checked_in = ROOT / "rlhf" / "v1" / path.name
        assert checked_in.exists(), f"{path.name} missing: run `rlhf codegen`"
        assert checked_in.read_text() == path.read_text(), \
            f"rlhf/v1/{path.name} is stale: run `rlhf codegen` and commit the result"
    names = {p.name for p in fresh}
    extra = {p.name for p in (ROOT / "rlhf" / "v1").glob("*_pb2*")} - names
    assert not extra, f"stubs without a .proto source: {extra}"


PRODUCT = ("rlhf", "serving", "learner", "ui")
PROCESSES = {"serving", "learner", "ui"}
DOOR = ROOT / "rlhf" / "cli.py"
"""The one door from the product to the processes and to bench/: `rlhf COMMAND` dispatches,
importing what it runs inside the command's function only."""


def _names(nodes) -> set[str]:
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _imports(path: Path) -> set[str]:
    return _names(ast.walk(ast.parse(path.read_text())))


def _module_level_imports(path: Path) -> set[str]:
    """What importing the module runs: everything but the bodies of functions."""
    def walk(node):
        yield node
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(child)

    return _names(walk(ast.parse(path.read_text())))


def _package_imports(package: str) -> dict[Path, set[str]]:
    return {p: _imports(p) for p in (ROOT / package).rglob("*.py")}


def _top(module: str) -> str:
    return module.split(".")[0]


def test_serving_and_learner_never_import_each_other():
    for package, banned in (("serving", {"learner", "ui"}), ("learner", {"serving", "ui"})):
        for path, modules in _package_imports(package).items():
            bad = {m for m in modules if _top(m) in banned}
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_ui_talks_to_the_wire_contract_only():
    for path, modules in _package_imports("ui").items():
        bad = {m for m in modules if _top(m) in {"serving", "learner", "torch", "transformers"}}
        # besides the wire contract: the task queue's Redis layout ("Next task" leases
        # queued prompts for the logged-in labeler; issue #15, docs/design.md §5b)
        allowed = ("rlhf.v1", "rlhf.tasks")
        bad |= {m for m in modules if _top(m) == "rlhf" and not m.startswith(allowed)}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_product_never_imports_the_benchmarks():
    """bench/ is its own top floor: it drives the product, the product never needs it."""
    for package in PRODUCT:
        for path, modules in _package_imports(package).items():
            if path == DOOR:
                continue  # its own rule: test_the_cli_dispatcher_is_the_one_door
            bad = {m for m in modules if _top(m) == "bench"}
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_shared_package_does_not_depend_on_a_process():
    for path, modules in _package_imports("rlhf").items():
        if path == DOOR:
            continue
        bad = {m for m in modules if _top(m) in PROCESSES}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_cli_dispatcher_is_the_one_door():
    """rlhf/cli.py reaches the processes and bench/ only from inside a command's function,
    so importing it (every `rlhf` command) loads none of them."""
    assert _imports(DOOR) & {"bench.cli", "bench.simulate", "serving.server"}, \
        "the dispatcher no longer runs the commands: update this rule"
    bad = {m for m in _module_level_imports(DOOR) if _top(m) in PROCESSES | {"bench"}}
    assert not bad, f"rlhf/cli.py imports {bad} at module level"


PURE_MATH = ["learner/losses.py", "learner/advantages.py", "learner/kl_control.py",
             "serving/sampling.py"]


def test_pure_math_imports_only_torch():
    for rel in PURE_MATH:
        path = ROOT / rel
        if not path.exists():
            continue
        extra = {m for m in _imports(path) if _top(m) not in {"torch", "__future__", "math"}}
        assert not extra, f"{rel} must import only torch, imports {extra}"


def test_trl_stays_in_the_benchmark_environment():
    """trl/datasets live only in .venv-trl (deploy/bench-env.sh): the product never needs
    them, only bench/'s side-by-side benchmarks against TRL do."""
    for package in PRODUCT:
        for path, modules in _package_imports(package).items():
            bad = {m for m in modules if _top(m) in {"trl", "datasets"}}
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_learner_never_sees_the_gold_preference():
    """Only bench/ (the efficacy harness, the benchmarks) scores with rlhf.gold; the learner
    learns from rankings alone (else "it learns" would be circular)."""
    for path, modules in _package_imports("learner").items():
        assert "rlhf.gold" not in modules, f"{path.relative_to(ROOT)} imports rlhf.gold"
