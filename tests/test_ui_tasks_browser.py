"""Queued tasks in a real headless Chromium, against real `rlhf serve`, `rlhf learn` and
`rlhf ui` processes and a real Redis: an operator loads tasks with `rlhf tasks load`; two
labelers take them with the keyboard only (N, digits, Enter); a golden task (mixed in at
rate 1 here) scores each of them; an overlapped task reaches both with the same answers
(the first labeler's, frozen); the Dashboard's Labelers view shows their agreement and
golden accuracy, the numbers rlhf.agreement gives on the stored records."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from rlhf import agreement, tasks
from rlhf.comparisons import STREAM, decode_entry
from rlhf.v1 import feedback_pb2 as fb
from tests import browser_kit
from tests.conftest import ROOT, RedisServer, ServerProcess
from tests.test_ui_browser import _free_port
from tests.test_ui_dashboard import _start, _stop, _wait_http, browser_test

DB = 9
UI_TOKEN, LEARN_TOKEN = "tasks-ui-token", "tasks-learn-token"
ACCOUNTS = {"alice": "pw-alice", "bob": "pw-bob"}
K = 4
WAIT_MS = browser_kit.WAIT_MS
GOLD = ["6", "It is six.", "33", "banana"]  # known ranking 1, 2, 3, 4
TASKS = [{"id": "ov-1", "prompt": "What is 2 + 2?", "labelers": 2},
         {"id": "gold-1", "prompt": "What is 3 + 3?", "candidates": GOLD,
          "golden": {"ranking": [1, 2, 3, 4]}}]


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, redis_server: RedisServer,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    url = redis_server.db_url(DB)
    client = redis.Redis.from_url(url)
    client.flushdb()
    root = tmp_path_factory.mktemp("ui-tasks")
    (root / "tasks.jsonl").write_text("\n".join(json.dumps(t) for t in TASKS) + "\n")
    loaded = subprocess.run([sys.executable, "-m", "rlhf.cli", "tasks", "load",
                             str(root / "tasks.jsonl"), "--redis-url", url], cwd=ROOT,
                            capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    serve = ServerProcess(tiny_model_dir, extra=["--redis-url", url, "--ui-token", UI_TOKEN])
    learn_port, ui_port = _free_port(), _free_port()
    learn = _start(
        [sys.executable, "-m", "rlhf.cli", "learn", "--model", str(tiny_model_dir),
         "--device", "cpu", "--threads", "1", "--port", str(learn_port),
         "--data-dir", str(root / "data"), "--adapter-store", str(root / "store")],
        {"RLHF_LEARN_REDIS_URL": url, "RLHF_LEARN_ADMIN_TOKEN": LEARN_TOKEN},
        root / "learn.log")
    ui = _start(
        [sys.executable, "-m", "rlhf.cli", "ui", "--port", str(ui_port), "--k", str(K),
         "--policy-target", serve.grpc_target, "--max-new-tokens", "10",
         "--min-new-tokens", "3", "--temperature", "1.0", "--golden-rate", "1.0",
         "--learner-url", f"http://127.0.0.1:{learn_port}"],
        {"RLHF_UI_USERS": ",".join(f"{u}:{p}" for u, p in ACCOUNTS.items()),
         "RLHF_UI_AUTH_TOKEN": UI_TOKEN, "RLHF_UI_REDIS_URL": url,
         "RLHF_UI_LEARNER_TOKEN": LEARN_TOKEN, "GRADIO_ANALYTICS_ENABLED": "False"},
        root / "ui.log")
    ui_url = f"http://127.0.0.1:{ui_port}/"
    try:
        _wait_http(ui_url, ui, root / "ui.log")
        _wait_http(f"http://127.0.0.1:{learn_port}/v1/status", learn, root / "learn.log")
        yield {"client": client, "ui_url": ui_url}
    finally:
        _stop(ui)
        _stop(learn)
        serve.stop()
        client.flushdb()
        client.close()


@pytest.fixture(scope="module")
def browser(stack):
    yield from browser_kit.launch()


def login(browser, stack: dict, user: str):
    page = browser_kit.logged_in(browser, stack["ui_url"], user, ACCOUNTS[user])
    page.locator("#shortcuts").click()  # focus the page, outside any text box
    return page


def next_task(page) -> list[str]:
    """Press N; wait for the task's answers; their texts by displayed position."""
    from playwright.sync_api import expect

    page.keyboard.press("n")
    expect(page.locator("#status")).to_contain_text("All answers are in", timeout=WAIT_MS)
    expect(page.locator("#submit")).to_be_enabled()
    return [page.locator(f"#cand-{pos}").get_by_role("textbox").input_value()
            for pos in range(K)]


def rank_by_keys(page, ranks: list[int]) -> None:
    """Digits rank the highlighted answer and move right; Enter submits."""
    from playwright.sync_api import expect

    for rank in ranks:
        page.keyboard.press(str(rank))
    for pos, rank in enumerate(ranks):  # the keys reached the radios
        expect(page.locator(f"#rank-{pos}").get_by_label(str(rank), exact=True)).to_be_checked()
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_contain_text("Ranking stored", timeout=WAIT_MS)


def stored(client: redis.Redis) -> list[fb.Comparison]:
    return [decode_entry(fields) for _, fields in client.xrange(STREAM)]


@browser_test
def test_two_labelers_rank_queued_tasks_from_the_keyboard(browser, stack):
    from playwright.sync_api import expect

    client = stack["client"]
    gold_rank = {text: i + 1 for i, text in enumerate(GOLD)}

    # alice: the golden task first (rate 1), ranked right; then the overlapped one, fresh
    alice = login(browser, stack, "alice")
    expect(alice.locator("#shortcuts")).to_contain_text("Enter")
    expect(alice.locator("#guidelines")).to_contain_text("Guidelines")
    shown = next_task(alice)
    assert sorted(shown) == sorted(GOLD)
    rank_by_keys(alice, [gold_rank[t] for t in shown])
    alice_texts = next_task(alice)
    alice_ranks = list(range(1, K + 1))  # left to right
    rank_by_keys(alice, alice_ranks)
    alice.keyboard.press("n")
    expect(alice.locator("#status")).to_contain_text("No queued task is left for you")

    # bob: the golden task ranked upside down; the overlapped task shows alice's answers
    bob = login(browser, stack, "bob")
    shown = next_task(bob)
    rank_by_keys(bob, [K + 1 - gold_rank[t] for t in shown])
    bob_texts = next_task(bob)
    assert sorted(bob_texts) == sorted(alice_texts)  # the same answers, frozen
    by_text = {t: r for t, r in zip(alice_texts, alice_ranks, strict=True)}
    swap = {1: 2, 2: 1}  # bob flips alice's top two
    rank_by_keys(bob, [swap.get(by_text[t], by_text[t]) for t in bob_texts])

    records = stored(client)
    assert sorted((r.labeler_id, r.task_id) for r in records) == [
        ("alice", "gold-1"), ("alice", "ov-1"), ("bob", "gold-1"), ("bob", "ov-1")]
    assert {r.labeler_auth for r in records} == {fb.LABELER_AUTH_UI_LOGIN}
    assert r_of(records, "bob", "ov-1").candidates[0].adapter_version == "base"
    # what the dashboard must show, from the stored records
    rated = [agreement.Rated(r.task_id, r.labeler_id, tasks.ranking_of(r)) for r in records]
    expected = agreement.pairwise_agreement(*(x.ranking for x in rated if x.task_id == "ov-1"))
    assert expected is not None and expected < 1.0

    dash = alice
    dash.get_by_role("tab", name="Dashboard").click()
    overall = dash.locator("#dash-labeler-overall")
    expect(overall).to_contain_text(f"Inter-labeler agreement: {100 * expected:.1f}%")
    expect(overall).to_contain_text("1 overlapped tasks")
    chart = dash.locator("#dash-labeler-chart")
    for who, accuracy in (("alice", 1.0), ("bob", 0.0)):
        bar = chart.locator(f'rect[data-labeler="{who}"][data-metric="golden_accuracy"]')
        expect(bar).to_have_attribute("data-value", repr(accuracy))
        bar = chart.locator(f'rect[data-labeler="{who}"][data-metric="agreement"]')
        expect(bar).to_have_attribute("data-value", repr(expected))
    expect(dash.locator("#dash-labeler-table")).to_contain_text("bob")


def r_of(records, who: str, task: str) -> fb.Comparison:
    return next(r for r in records if r.labeler_id == who and r.task_id == task)
