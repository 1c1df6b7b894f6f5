"""The Dashboard tab in a real headless Chromium, against a real `rlhf learn` child (tiny
model), a real `rlhf ui` child and a real Redis: an operator sees the queue and labeler
counts of what is in the stream, triggers an iteration, watches its progress refresh by
itself until it finished, then finds the new adapter and the iteration's RM accuracy; a
non-operator gets no working trigger (in the browser nor through the handler); a trigger
while one runs and a learner that is down are plain messages. No `rlhf serve` is needed:
the tab talks to the learner only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import httpx
import pytest
import redis

from rlhf import comparisons
from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import policy_pb2 as pb
from tests import browser_kit
from tests.conftest import ROOT, RedisServer
from tests.test_ui_browser import CHROMIUM, _free_port
from ui.config import UIConfig
from ui.dashboard import DashboardTab, curve_charts, fmt, iterations_table, progress_text

TOKEN = "dash-ui-token"
ACCOUNTS = {"alice": "pw-alice", "bob": "pw-bob"}  # alice is the operator
WAIT_MS = browser_kit.WAIT_MS
TASKS = [("What is 2 + 3?", "5"), ("What is 4 + 1?", "5"), ("What is 6 - 2?", "4"),
         ("What is 3 + 3?", "6"), ("What is 7 - 5?", "2"), ("What is 1 + 8?", "9")]
LABELERS = ["alice", "bob", "carol", "alice", "bob", "carol", "alice"]

BROWSER = [pytest.mark.browser, pytest.mark.slow,
           pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("CI"),
                              reason=f"{CHROMIUM} is absent: run ./deploy/setup.sh")]


def browser_test(fn):
    for mark in BROWSER:
        fn = mark(fn)
    return fn


def comparison(i: int, labeler: str) -> fb.Comparison:
    prompt, answer = TASKS[i % len(TASKS)]
    rec = fb.Comparison(id=f"ui-dash-{i:03d}", labeler_id=labeler,
                        messages=[pb.ChatMessage(role="user", content=prompt)])
    for rank, text in enumerate([f"{answer}.", f"Well, maybe {answer}, or not.", "banana"], 1):
        rec.candidates.add(text=text, adapter_version="base", position=rank - 1, rank=rank)
    rec.received_at.FromMilliseconds(1_700_000_000_000 + i)
    return rec


def _start(cmd: list[str], env: dict, log_path: Path, stdout=None) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=stdout or log, stderr=log, text=True,
                                env={**os.environ, **env})


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, redis_server: RedisServer,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Redis db 11 holding 7 comparisons, `rlhf learn` and `rlhf ui`, started side by side."""
    url = redis_server.db_url(11)
    client = redis.Redis.from_url(url)
    client.flushdb()
    comparisons.append_many(client, [comparison(i, who) for i, who in enumerate(LABELERS)])
    root = tmp_path_factory.mktemp("ui-dashboard")
    learn_port, ui_port = _free_port(), _free_port()
    learn = _start(
        [sys.executable, "-m", "rlhf.cli", "learn", "--model", str(tiny_model_dir),
         "--device", "cpu", "--threads", "1", "--port", str(learn_port),
         "--data-dir", str(root / "data"), "--adapter-store", str(root / "store"),
         "--prompts-per-iteration", "6", "--eval-prompts", "2", "--ptx-eval-texts", "2",
         "--rm-batch", "4", "--rm-max-length", "64", "--rm-lora-rank", "4",
         "--rm-heldout-fraction", "0.3", "--ppo-steps", "24", "--ppo-batch-size", "2",
         "--ppo-minibatch-size", "2", "--ppo-max-new-tokens", "16", "--ppo-lora-rank", "4"],
        {"RLHF_LEARN_REDIS_URL": url, "RLHF_LEARN_ADMIN_TOKEN": TOKEN}, root / "learn.log",
        stdout=subprocess.PIPE)
    ui = _start(
        [sys.executable, "-m", "rlhf.cli", "ui", "--port", str(ui_port),
         "--policy-target", f"127.0.0.1:{_free_port()}",  # nothing there: not needed here
         "--learner-url", f"http://127.0.0.1:{learn_port}", "--operators", "alice",
         "--dashboard-refresh-s", "0.5"],
        {"RLHF_UI_USERS": ",".join(f"{u}:{p}" for u, p in ACCOUNTS.items()),
         "RLHF_UI_LEARNER_TOKEN": TOKEN, "GRADIO_ANALYTICS_ENABLED": "False"},
        root / "ui.log")
    learner_url, ui_url = f"http://127.0.0.1:{learn_port}", f"http://127.0.0.1:{ui_port}/"
    try:
        line = learn.stdout.readline()  # the model is loaded before "listening"
        assert line, "rlhf learn exited:\n" + (root / "learn.log").read_text()[-4000:]
        assert json.loads(line)["event"] == "listening"
        _wait_http(ui_url, ui, root / "ui.log")
        _wait_http(learner_url + "/v1/status", learn, root / "learn.log")
        yield {"client": client, "learn": learn, "learner_url": learner_url, "ui_url": ui_url,
               "root": root}
    finally:
        _stop(ui)
        _stop(learn)
        client.flushdb()
        client.close()


def _wait_http(url: str, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up:\n" + log_path.read_text()[-4000:])
        try:
            httpx.get(url, timeout=2)  # any answer (401 included) means it listens
            return
        except httpx.HTTPError:
            time.sleep(0.2)  # polling a starting process, not waiting on the page


@pytest.fixture(scope="module")
def browser(stack):
    yield from browser_kit.launch()


def open_dashboard(browser, stack: dict, user: str):
    """A fresh browser context logged in as ``user``, on the Dashboard tab."""
    page = browser_kit.logged_in(browser, stack["ui_url"], user, ACCOUNTS[user])
    page.get_by_role("tab", name="Dashboard").click()
    return page


def table(page, elem_id: str) -> list[list[str]]:
    """The body rows of the Markdown table in ``#elem_id``, as cell texts."""
    rows = page.locator(f"#{elem_id} table tbody tr")
    return [[c.strip() for c in rows.nth(i).locator("td").all_inner_texts()]
            for i in range(rows.count())]


def api(stack: dict, path: str) -> dict:
    reply = httpx.get(stack["learner_url"] + path, timeout=30,
                      headers={"Authorization": f"Bearer {TOKEN}"})
    reply.raise_for_status()
    return reply.json()


@browser_test
def test_progress_text_names_skipped_phases():
    done = {"id": "it-0002", "status": "done", "version": "v2", "seconds": 3.0}
    assert "skipped" not in progress_text({}, [done])
    text = progress_text({}, [{**done, "skipped": ["sft"]}])
    assert "published `v2`" in text and text.endswith("(sft skipped: nothing new)")
    running = {"id": "it-0003", "phase": "sft", "phase_number": 2, "phases": 7, "step": 3,
               "steps": 8, "started_at": time.time()}
    assert "phase 2/7 `sft`, step 3/8" in progress_text({"running": True, "iteration": running},
                                                         [])


def test_operator_triggers_and_watches_an_iteration(browser, stack):
    from playwright.sync_api import expect

    page = open_dashboard(browser, stack, "alice")
    expect(page.locator("#dash-queue")).to_contain_text("Waiting for the learner: 7")
    expect(page.locator("#dash-labelers table")).to_be_visible()
    assert table(page, "dash-labelers") == [["alice", "3", "0", "0", "0"],
                                            ["bob", "2", "0", "0", "0"],
                                            ["carol", "2", "0", "0", "0"]]
    expect(page.locator("#dash-adapters")).to_contain_text("No adapter published yet")
    expect(page.locator("#dash-progress")).to_contain_text("no iteration has run yet")

    page.locator("#dash-trigger").click()
    expect(page.locator("#dash-message")).to_contain_text("Started iteration")
    # The timer refreshes the progress by itself: a phase n/6, then the finished iteration.
    expect(page.locator("#dash-progress")).to_contain_text("running: phase")
    expect(page.locator("#dash-trigger")).to_be_disabled()
    expect(page.locator("#dash-progress")).to_contain_text("Idle. Last iteration",
                                                           timeout=WAIT_MS)
    [done] = api(stack, "/v1/iterations")["iterations"]
    assert done["status"] == "done", done.get("error")
    expect(page.locator("#dash-progress")).to_contain_text(f"{done['id']} done")
    expect(page.locator("#dash-trigger")).to_be_enabled()

    [row] = table(page, "dash-iterations")
    assert row[:4] == [done["id"], "done", "v1", fmt(done["metrics"]["rm/accuracy"])]
    [adapter] = table(page, "dash-adapters")
    assert adapter[:2] == ["v1 (current)", "–"] and adapter[3] == done["id"]
    expect(page.locator("#dash-queue")).to_contain_text("Waiting for the learner: 0")
    assert table(page, "dash-labelers") == [["alice", "3", "3", "0", "0"],
                                            ["bob", "2", "2", "0", "0"],
                                            ["carol", "2", "2", "0", "0"]]
    # The RM-accuracy curve has the iteration's point, at its exact value.
    point = page.locator(f'#dash-plot-0 circle[data-metric="rm/accuracy"]'
                         f'[data-iteration="{done["id"]}"]')
    expect(point).to_have_count(1)
    assert float(point.get_attribute("data-value")) == done["metrics"]["rm/accuracy"]
    page.context.close()


@browser_test
def test_non_operator_sees_the_dashboard_read_only(browser, stack):
    from playwright.sync_api import expect

    page = open_dashboard(browser, stack, "bob")
    expect(page.locator("#dash-note")).to_contain_text("only operators")
    expect(page.locator("#dash-queue")).to_contain_text("Waiting for the learner")
    expect(page.locator("#dash-trigger")).to_be_disabled()
    page.context.close()

    # Gradio events can be called without the page: the handler itself refuses bob.
    before = len(api(stack, "/v1/iterations")["iterations"])
    config = UIConfig(learner_url=stack["learner_url"], learner_token=TOKEN,
                      operators="alice")
    tab = DashboardTab(config)
    with gr.Blocks(), gr.Tab("Dashboard") as t:
        tab.build(t)
    out = tab.trigger(gr.Request(username="bob"))
    assert "Only operators" in out[tab.message]
    assert len(api(stack, "/v1/iterations")["iterations"]) == before
    assert not api(stack, "/v1/status")["running"]

    # An operator's second trigger while one runs: the learner's 409, said plainly.
    first = tab.trigger(gr.Request(username="alice"))
    assert "Started iteration" in first[tab.message], first[tab.message]
    second = tab.trigger(gr.Request(username="alice"))
    assert "already running" in second[tab.message], second[tab.message]
    deadline = time.monotonic() + 120
    while api(stack, "/v1/status")["running"]:  # let it finish before the next test
        assert time.monotonic() < deadline, "the second iteration did not finish"
        time.sleep(0.2)
    assert len(api(stack, "/v1/iterations")["iterations"]) == before + 1


@browser_test
def test_learner_down_is_a_plain_message(browser, stack):
    from playwright.sync_api import expect

    page = open_dashboard(browser, stack, "alice")
    expect(page.locator("#dash-queue")).to_contain_text("Waiting for the learner")
    _stop(stack["learn"])
    page.locator("#dash-refresh").click()
    expect(page.locator("#dash-message")).to_contain_text("is unreachable")
    expect(page.locator("#dash-queue")).to_contain_text("Waiting for the learner")  # kept
    page.context.close()


# --- what the tab draws, without a browser ------------------------------------------------

HISTORY = [{"id": "it-0001", "status": "done", "version": "v1", "seconds": 2.0,
            "metrics": {"rm/accuracy": 0.625, "ppo/kl": 0.004}},
           {"id": "it-0002", "status": "failed", "version": None, "seconds": 0.5,
            "metrics": {}},
           {"id": "it-0003", "status": "done", "version": "v2", "seconds": 2.5,
            "metrics": {"rm/accuracy": 0.75, "ppo/kl": 0.002, "gold/win_rate": 0.6}}]


def test_curves_draw_every_logged_point_including_metrics_that_appear_later():
    accuracy, _, kl, ptx = curve_charts(HISTORY)
    assert accuracy.count('data-metric="rm/accuracy"') == 2
    assert 'data-metric="gold/win_rate" data-iteration="it-0003" data-value="0.6"' in accuracy
    assert kl.count("<circle") == 2 and "<polyline" in kl
    assert "No data yet" in ptx and "<svg" not in ptx  # nothing logged: no empty axes


def test_iteration_table_shows_only_logged_metrics_newest_first():
    lines = iterations_table(HISTORY).splitlines()
    assert lines[0] == ("| iteration | status | version | RM accuracy | KL | gold/win_rate "
                        "| seconds |")
    assert lines[2] == "| it-0003 | done | v2 | 0.75 | 0.002 | 0.6 | 2.5 |"
    assert lines[3] == "| it-0002 | failed | – | – | – | – | 0.5 |"
