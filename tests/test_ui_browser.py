"""The ranking UI in a real headless Chromium, against real `rlhf serve` and `rlhf ui`
processes and a real Redis: log in, rank K streamed answers with a tie and a flag, find the
exact record in the stream, continue the chat, and retry after a Redis outage."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from rlhf.v1 import feedback_pb2 as fb
from serving.feedback import ID_INDEX, STREAM, decode_entry
from tests.conftest import ROOT, RedisServer, ServerProcess

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
USER, PASSWORD = "alice", "pw-alice"
K = 4
WAIT_MS = 120_000  # generous: 2 CPU cores shared by serve, ui, redis and the browser

pytestmark = [
    pytest.mark.browser,
    # deploy/setup.sh installs Chromium, so under CI a missing browser is a failure, not a skip.
    pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("CI"),
                       reason=f"{CHROMIUM} is absent: run ./deploy/setup.sh"),
]


def _db_url(redis_server: RedisServer) -> str:
    """Database 1, cleaned before and after, so other suites see nothing of ours."""
    return redis_server.db_url(1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(_db_url(redis_server))
    client.delete(STREAM, ID_INDEX)
    yield client
    client.delete(STREAM, ID_INDEX)
    client.close()


@pytest.fixture(scope="module")
def serve(tiny_model_dir: Path, r: redis.Redis, redis_server: RedisServer
          ) -> Iterator[ServerProcess]:
    srv = ServerProcess(tiny_model_dir, extra=["--redis-url", _db_url(redis_server)])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def ui_url(serve: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log_path = tmp_path_factory.mktemp("ui") / "ui.log"
    cmd = [sys.executable, "-m", "rlhf.cli", "ui", "--policy-target", serve.grpc_target,
           "--port", str(port), "--k", str(K), "--max-new-tokens", "12",
           "--min-new-tokens", "3", "--temperature", "1.0"]
    env = {**os.environ, "RLHF_UI_USERS": f"{USER}:{PASSWORD},bob:pw-bob",
           "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("rlhf ui did not come up:\n" + log_path.read_text()[-4000:])
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)  # polling a starting process, not waiting on the page
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture()
def page(ui_url: str):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page()
            pg.set_default_timeout(WAIT_MS)
            pg.goto(ui_url)
            yield pg
        finally:
            browser.close()


def _login(page) -> None:
    page.locator("input[type=text]").first.fill(USER)
    page.locator("input[type=password]").first.fill(PASSWORD)
    page.get_by_role("button", name="Login").click()


def _ask(page, text: str) -> list[str]:
    """Send a message, wait until all K answers finished; their texts by position."""
    from playwright.sync_api import expect

    page.locator("#msg").get_by_role("textbox").fill(text)
    page.locator("#send").click()
    expect(page.locator("#status")).to_contain_text("All answers are in", timeout=WAIT_MS)
    expect(page.locator("#rank-0 input").first).to_be_enabled()
    expect(page.locator("#submit")).to_be_enabled()
    texts = [page.locator(f"#cand-{pos}").get_by_role("textbox").input_value()
             for pos in range(K)]
    assert all(t.strip() for t in texts), texts
    return texts


def _rank(page, ranks: list[int]) -> None:
    for pos, rank in enumerate(ranks):
        page.locator(f"#rank-{pos}").get_by_label(str(rank), exact=True).check()


def _stored_id(page) -> str:
    from playwright.sync_api import expect

    status = page.locator("#status")
    expect(status).to_contain_text("Ranking stored", timeout=WAIT_MS)
    return re.search(r"id ([0-9a-f]{32})", status.inner_text()).group(1)


def _record(r: redis.Redis, comparison_id: str) -> fb.Comparison:
    entry = r.hget(ID_INDEX, comparison_id)
    assert entry is not None, f"{comparison_id} is not in the stream"
    [(_, fields)] = r.xrange(STREAM, entry, entry)
    return decode_entry(fields)


def _entries_with_id(r: redis.Redis, comparison_id: str) -> int:
    return sum(f[b"id"].decode() == comparison_id for _, f in r.xrange(STREAM))


def test_rank_submit_continue_and_retry_after_redis_outage(page, r, redis_server):
    from playwright.sync_api import expect

    _login(page)
    expect(page.locator("#header")).to_contain_text("base")
    expect(page.locator("#header")).to_contain_text(USER)

    # 1. K answers stream in; rank them with a tie (positions 0 and 2), flag one, submit.
    texts = _ask(page, "What is 12 + 7?")
    _rank(page, [2, 1, 2, 4])
    page.locator("#flags-3").get_by_label("Made up facts").check()
    page.locator("#comment").get_by_role("textbox").fill("the second one is best")
    page.locator("#submit").click()
    first_id = _stored_id(page)

    record = _record(r, first_id)
    assert record.labeler_id == USER and record.comment == "the second one is best"
    assert [(m.role, m.content) for m in record.messages] == [("user", "What is 12 + 7?")]
    by_pos = sorted(record.candidates, key=lambda c: c.position)
    assert [c.position for c in by_pos] == list(range(K))
    assert [c.text for c in by_pos] == texts
    assert [c.rank for c in by_pos] == [2, 1, 2, 4]  # the tie survived
    assert [list(c.flags) for c in by_pos] == [[], [], [], [fb.FLAG_MADE_UP_FACTS]]
    assert {c.adapter_version for c in by_pos} == {"base"}
    assert len({c.request_id for c in by_pos}) == 1 and by_pos[0].request_id
    assert sorted(c.seed for c in record.candidates) == [
        record.candidates[0].sampling.seed + i for i in range(K)]
    assert record.created_at.ToMilliseconds() > 0
    assert _entries_with_id(r, first_id) == 1

    # 2. The chat continues from the top-ranked answer (position 1).
    expect(page.locator("#rank-0 input").first).to_be_disabled()
    second_texts = _ask(page, "And 3 + 4?")

    # 3. Redis down: the submission fails plainly and is kept for Retry.
    before = r.xlen(STREAM)
    _rank(page, [1, 1, 1, 1])
    redis_server.stop()
    try:
        page.locator("#submit").click()
        expect(page.locator("#status")).to_contain_text("NOT stored", timeout=WAIT_MS)
        expect(page.locator("#retry")).to_be_visible()
    finally:
        redis_server.start()

    # 4. Retry sends the same record once; it answers the conversation with the top answer.
    page.locator("#retry").click()
    retry_id = _stored_id(page)
    expect(page.locator("#retry")).to_be_hidden()
    assert retry_id != first_id
    assert _entries_with_id(r, retry_id) == 1 and r.xlen(STREAM) == before + 1
    again = _record(r, retry_id)
    assert [(m.role, m.content) for m in again.messages] == [
        ("user", "What is 12 + 7?"), ("assistant", texts[1]), ("user", "And 3 + 4?")]
    assert [c.rank for c in again.candidates] == [1] * K
    assert sorted(c.text for c in again.candidates) == sorted(second_texts)
