"""`rlhf up` as a user runs it: a real launcher process starting a private redis-server,
`rlhf serve`, `rlhf learn` and `rlhf ui` (tiny model, free ports); every part answers; SIGINT
stops them in reverse order and leaves no process behind; a part that dies takes the rest
down and the launcher exits non-zero naming it. Plus the config-file rules."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.up_config import parse_args, read_config_file
from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import feedback_pb2_grpc as fbg
from rlhf.v1 import policy_pb2 as pb
from rlhf.v1 import policy_pb2_grpc as pbg
from tests.conftest import ROOT

OPERATOR_TOKEN = "op-token"
USERS = "alice:pw-alice,bob:pw-bob"

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (deploy/setup.sh)")


class UpProcess:
    """`rlhf up --config FILE --model DIR` in the background on free ports."""

    def __init__(self, model_dir: Path, tmp: Path, toml_extra: str = "", k: int = 4,
                 ready_timeout: float = 240.0) -> None:
        self.data_dir = tmp / "data"
        config = tmp / "up.toml"
        config.write_text(
            f'data_dir = "{self.data_dir}"\nredis_port = 0\ngrpc_port = 0\nhttp_port = 0\n'
            f'learner_port = 0\nui_port = 0\ndevice = "cpu"\nk = {k}\nusers = "{USERS}"\n'
            f'operator_token = "{OPERATOR_TOKEN}"\nstop_timeout_s = 30\n{toml_extra}\n')
        self.stderr_path = tmp / "up.stderr"
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rlhf.cli", "up", "--config", str(config),
                 "--model", str(model_dir)], cwd=ROOT, stdout=subprocess.PIPE, stderr=err,
                text=True, start_new_session=True)
        self.lines: list[str] = []
        self.ready: dict | None = None
        got_ready = threading.Event()
        threading.Thread(target=self._read, args=(got_ready,), daemon=True).start()
        if not got_ready.wait(ready_timeout) or self.ready is None:
            self.kill()
            raise RuntimeError(f"rlhf up did not become ready (exit code "
                               f"{self.proc.returncode}):\n" + self.log()[-6000:])

    def _read(self, got_ready: threading.Event) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith('{"event": "ready"'):
                self.ready = json.loads(line)
                got_ready.set()
        got_ready.set()  # EOF: the launcher ended before it was ready

    def log(self) -> str:
        return "".join(self.lines) + "\n--- stderr ---\n" + self.stderr_path.read_text()

    @property
    def pids(self) -> dict[str, int]:
        return dict(self.ready["pids"]) if self.ready else {}

    def stop(self, sig: int = signal.SIGINT, timeout: float = 90.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """Last resort after a failed test: SIGTERM then SIGKILL the launcher (its children
        die with it through PDEATHSIG)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def leftovers(self) -> list[str]:
        """Live processes that are ours: a recorded PID, or anything naming our data dir."""
        found = [f"{name} (pid {pid})" for name, pid in self.pids.items() if _alive(pid)]
        return found + _our_processes(self.data_dir)


def _our_processes(data_dir: Path) -> list[str]:
    """Running processes whose command line names ``data_dir`` (redis, serve, learn)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(data_dir) in cmdline and _alive(int(entry.name)):
            found.append(f"pid {entry.name}: {cmdline[:160]}")
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie is not: nothing of it runs any more)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(up: UpProcess, timeout: float = 15.0) -> list[str]:
    """Leftovers after the launcher exited, allowing the kernel a moment to reap."""
    deadline = time.monotonic() + timeout
    while (left := up.leftovers()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.fixture()
def up_factory(tiny_model_dir: Path, tmp_path: Path):
    started: list[UpProcess] = []

    def make(**kwargs) -> UpProcess:
        where = tmp_path / f"up{len(started)}"
        where.mkdir()
        up = UpProcess(tiny_model_dir, where, **kwargs)
        started.append(up)
        return up

    yield make
    for up in started:
        up.kill()


def test_config_file_values_and_child_tables(tmp_path: Path, monkeypatch):
    path = tmp_path / "up.toml"
    path.write_text('model = "m"\nui_port = 0\nload_in_4bit = true\n'
                    '[learn]\nppo_steps = 2\nauto_trigger_after = 0\n[serve]\nthreads = 1\n'
                    'load_in_4bit = false\n')
    values, extras = read_config_file(str(path))
    assert values == {"RLHF_UP_MODEL": "m", "RLHF_UP_UI_PORT": "0",
                      "RLHF_UP_LOAD_IN_4BIT": "true"}
    assert extras == {"learn": ["--ppo-steps", "2", "--auto-trigger-after", "0"],
                      "serve": ["--threads", "1", "--no-load-in-4bit"], "ui": []}
    monkeypatch.setenv("RLHF_UP_UI_PORT", "7000")  # env beats the file, the flag beats both
    config, _, _ = parse_args(["--config", str(path), "--model", "flag-model"])
    assert (config.model, config.ui_port, config.load_in_4bit) == ("flag-model", 7000, True)
    assert config.learner_procs == 1
    assert parse_args(["--learner-procs", "2"])[0].learner_procs == 2  # -> rlhf learn --nproc
    with pytest.raises(SystemExit):
        parse_args(["--learner-procs", "0"])

    path.write_text('modle = "typo"\n')
    with pytest.raises(ValueError, match="unknown key 'modle'"):
        read_config_file(str(path))
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "up", "--config", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown key 'modle'" in proc.stderr


@pytest.mark.slow
def test_up_starts_every_part_and_sigint_stops_all(up_factory):
    up = up_factory()
    ready = up.ready
    assert set(ready["pids"]) == {"redis", "serve", "learn", "ui"}

    # Redis: the private one, AOF on, its data under --data-dir.
    r = redis.Redis.from_url(ready["redis"], decode_responses=True)
    assert r.ping() and r.config_get("appendonly") == {"appendonly": "yes"}
    assert r.config_get("dir")["dir"] == str(up.data_dir / "redis")
    r.close()
    # Serving: health SERVING, GetInfo names the model; OpenAI HTTP answers.
    with grpc.insecure_channel(ready["grpc"]) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        info = pbg.PolicyStub(channel).GetInfo(pb.GetInfoRequest())
        assert info.current_adapter_version == "base"
    assert httpx.get(ready["http"] + "/models", timeout=10).status_code == 200
    # Rankings: only through the UI's credential (written owner-only for local tools), which
    # names the labeler; an anonymous program cannot rank as anyone.
    token_file = up.data_dir / "ui-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    ui_token = token_file.read_text().strip()
    assert len(ui_token) >= 32 and ui_token not in "".join(up.lines)
    with grpc.insecure_channel(ready["grpc"]) as channel:
        feedback = fbg.FeedbackStub(channel)
        ranking = fb.Comparison(id="up-test-0001", labeler_id="alice", messages=[
            pb.ChatMessage(role="user", content="hi")])
        for i in range(2):
            ranking.candidates.add(text=f"answer {i}", adapter_version="base", position=i,
                                   rank=i + 1)
        with pytest.raises(grpc.RpcError) as err:
            feedback.Submit(fb.SubmitRequest(comparison=ranking), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stored = feedback.Submit(fb.SubmitRequest(comparison=ranking), timeout=10, metadata=[
            ("authorization", f"Bearer {ui_token}"), ("x-rlhf-labeler", "alice")])
        assert not stored.duplicate
    # Learner: its admin API wants the operator token from the config file.
    status = ready["learner"] + "/v1/status"
    assert httpx.get(status, timeout=10).status_code == 401
    reply = httpx.get(status, headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"}, timeout=10)
    assert reply.status_code == 200 and reply.json()["running"] is False
    # UI: the login page is served.
    assert httpx.get(ready["ui"], timeout=10).status_code == 200
    # Output of each part arrives prefixed.
    text = "".join(up.lines)
    for name in ("redis", "serve", "learn", "ui"):
        assert f"\n{name:<5} | " in text, name

    assert up.stop(signal.SIGINT) == 0, up.log()[-4000:]
    assert wait_gone(up) == []
    err = up.stderr_path.read_text()
    order = [err.index(f"stopping {name} ") for name in ("ui", "learn", "serve", "redis")]
    assert order == sorted(order), err[-3000:]  # reverse start order
    assert any((up.data_dir / "redis" / "appendonlydir").iterdir())  # AOF written


@pytest.mark.slow
def test_a_part_that_dies_stops_the_rest(up_factory):
    up = up_factory()
    os.kill(up.pids["learn"], signal.SIGKILL)  # as the OOM killer would
    assert up.proc.wait(90) == 1
    err = up.stderr_path.read_text()
    assert "learn exited with code -9; stopping the rest" in err, err[-3000:]
    order = [err.index(f"stopping {name} ") for name in ("ui", "serve", "redis")]
    assert order == sorted(order), err[-3000:]
    assert wait_gone(up) == []
