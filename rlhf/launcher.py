"""`rlhf up`: the whole loop on one machine — Redis, serving, learner, ranking UI.

Phases: (1) Redis: a private ``redis-server`` (deploy/redis.conf, AOF on, data under
``--data-dir``) unless ``--redis-url`` names one; wait for PING. (2) A named ``--model``
(default SmolLM2-135M-Instruct; ``starter`` = the built-in one): ``rlhf models pull`` it
(minutes the first time, cached after). (3) ``rlhf serve`` and
``rlhf learn`` side by side; wait for serving's ``ready`` line and the learner's
``GET /v1/status``. (4) ``rlhf ui``; wait for HTTP 200. (5) Print the addresses (and one
JSON ``ready`` line on stdout) and run until SIGINT/SIGTERM or until a part dies.
(6) Stop in reverse order: SIGTERM, wait, SIGKILL after ``--stop-timeout-s``.

Each part runs as ``python -m rlhf.cli <cmd>`` (rlhf.procs) with its output prefixed
(``serve | ...``). Serving binds rankings to labelers: the UI gets a service token
(``--ui-token``, random per start unless given, also written to ``DATA_DIR/ui-token`` for
`rlhf simulate`) and forwards its logged-in user; other programs need per-labeler tokens
(``[serve] labeler_tokens = "FILE"``). Settings: flag > ``RLHF_UP_*`` env var >
``--config`` TOML file > default; the file's ``[serve]``, ``[learn]`` and ``[ui]`` tables
add any flag of that command (``[learn] ppo_steps = 2``), and ``RLHF_SERVE_*``,
``RLHF_LEARN_*``, ``RLHF_UI_*`` variables reach the children unchanged. Exit code 0 after
a requested stop, 1 when a part failed.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rlhf import settings
from rlhf.procs import Child, Event, write_line
from rlhf.up_config import UpConfig, parse_args

log = logging.getLogger(__name__)

REDIS_CONF = Path(__file__).resolve().parent.parent / "deploy" / "redis.conf"
POLL_S = 0.2


# --- small helpers ---------------------------------------------------------------------------


class Stopped(Exception):
    """SIGINT/SIGTERM arrived."""


class PartFailed(Exception):
    """A part exited, or did not become ready in time."""


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def connect_host(host: str) -> str:
    """The address a local client uses for a server bound to ``host``."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def _redis_answers(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1.0)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _http_ok(url: str, token: str = "") -> bool:
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return httpx.get(url, headers=headers, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def account_names(users: str) -> str:
    """'alice:pw,bob:pw' -> 'alice, bob' (never the passwords); a file -> 'from FILE'."""
    if ":" not in users.split(",")[0]:
        return f"from {users}"
    return ", ".join(item.split(":")[0].strip() for item in users.split(",") if item.strip())


def rlhf_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "rlhf.cli", *args]


# --- the launcher ----------------------------------------------------------------------------


class Launcher:
    """Starts the parts in order, watches them, stops them in reverse order."""

    def __init__(self, config: UpConfig, extras: dict[str, list[str]]) -> None:
        self.config, self.extras = config, extras
        self.data = Path(config.data_dir).expanduser().resolve()
        self.events: queue.Queue[Event] = queue.Queue()
        self.children: dict[str, Child] = {}
        self.seen: dict[str, dict[str, dict]] = {}  # child -> JSON event name -> the event
        self.signals = 0
        self.client_host = connect_host(config.host)
        # Secrets a user may already keep in the children's own variables count as given.
        self.users = config.users or os.environ.get("RLHF_UI_USERS") or "demo:demo"
        self.operator_token = config.operator_token or os.environ.get(
            "RLHF_LEARN_ADMIN_TOKEN", "")
        self.auth_token = config.auth_token or os.environ.get("RLHF_SERVE_AUTH_TOKEN", "")
        # The UI (and `rlhf simulate`) submit rankings through this token, naming the
        # labeler; serving believes that name from no other credential.
        self.ui_token = (config.ui_token or os.environ.get("RLHF_SERVE_UI_TOKEN")
                         or secrets.token_urlsafe(32))
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}

    # -- plumbing ---------------------------------------------------------------------------
    def on_signal(self, signum: int, _frame: object) -> None:
        self.signals += 1
        if self.signals == 1:
            log.info("%s: stopping everything (again to hurry)", signal.Signals(signum).name)

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, cmd, self.events, env={**self.env, **(env or {})})
        self.children[name] = child
        log.info("started %s (pid %d)", name, child.pid)
        return child

    def wait_for(self, what: str, ready: Callable[[], Any], timeout: float | None) -> Any:
        """Handle events until ``ready()`` is truthy; raise on a signal, a death, a timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.signals:
                raise Stopped()
            try:
                event = self.events.get(timeout=POLL_S)
            except queue.Empty:
                event = None
            if event is not None:
                self._handle(event)
            result = ready()
            if result:
                return result
            if deadline is not None and time.monotonic() > deadline:
                raise PartFailed(f"{what} was not ready after {timeout:.0f} s")

    def _handle(self, event: Event) -> None:
        if event.rc is not None:
            if event.name == "build" and event.rc == 0:
                return
            raise PartFailed(f"{event.name} exited with code {event.rc}")
        if event.line.startswith("{"):
            try:
                body = json.loads(event.line)
            except ValueError:
                return
            if isinstance(body, dict) and "event" in body:
                self.seen.setdefault(event.name, {})[str(body["event"])] = body

    def event(self, name: str, kind: str) -> dict | None:
        return self.seen.get(name, {}).get(kind)

    # -- phases -----------------------------------------------------------------------------
    def write_ui_token(self) -> Path:
        """DATA_DIR/ui-token (owner-only), so local tools such as `rlhf simulate` can rank
        through the UI's credential."""
        self.data.mkdir(parents=True, exist_ok=True)
        path = self.data / "ui-token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.ui_token + "\n")
        os.chmod(path, 0o600)  # an older file keeps its mode through O_TRUNC
        return path

    def phase_redis(self) -> str:
        """A private redis-server unless --redis-url; returns the URL once it answers."""
        c = self.config
        if c.redis_url:
            self.wait_for("Redis at --redis-url", lambda: _redis_answers(c.redis_url),
                          c.ready_timeout_s)
            return c.redis_url
        port = c.redis_port or free_port("127.0.0.1")
        (self.data / "redis").mkdir(parents=True, exist_ok=True)
        conf = [str(REDIS_CONF)] if REDIS_CONF.is_file() else []
        self.start("redis", [c.redis_server, *conf, "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", str(self.data / "redis"), "--appendonly", "yes",
                             "--daemonize", "no", "--logfile", ""])
        url = f"redis://127.0.0.1:{port}/0"
        self.wait_for("redis", lambda: _redis_answers(url), c.ready_timeout_s)
        return url

    def phase_build(self) -> None:
        """A named model (the default SmolLM2, the starter): fetch/convert or build it once
        (``rlhf models pull``, minutes the first time, cached after) before serve and learn
        both load it."""
        from rlhf.modeling import model_kind

        if model_kind(self.config.model) != "named":
            return
        name = self.config.model or "starter"
        log.info("finding %s in the model cache (the first time it is fetched/built)", name)
        build = self.start("build", rlhf_cmd("models", "pull", name))
        self.wait_for(f"the model {name}", lambda: build.proc.poll() == 0, None)
        build.stop(self.config.stop_timeout_s)  # collects its output thread
        del self.children["build"]

    def phase_serve_and_learn(self, redis_url: str) -> None:
        c, store = self.config, str(self.data / "adapters")
        common = ["--device", c.device, "--load-in-4bit" if c.load_in_4bit else "--no-load-in-4bit"]
        self.start("serve", rlhf_cmd(
            "serve", "--model", c.model, "--host", c.host, "--grpc-port", str(c.grpc_port),
            "--http-port", str(c.http_port), "--adapter-store", store, *common,
            *self.extras["serve"]),
            env={"RLHF_SERVE_REDIS_URL": redis_url, "RLHF_SERVE_AUTH_TOKEN": self.auth_token,
                 "RLHF_SERVE_UI_TOKEN": self.ui_token})
        self.start("learn", rlhf_cmd(
            "learn", "--model", c.model, "--host", c.host, "--port", str(c.learner_port),
            "--data-dir", str(self.data / "learner"), "--adapter-store", store,
            "--nproc", str(c.learner_procs), *common, *self.extras["learn"]),
            env={"RLHF_LEARN_REDIS_URL": redis_url,
                 "RLHF_LEARN_ADMIN_TOKEN": self.operator_token})
        self.wait_for("serve", lambda: self.event("serve", "ready"), c.ready_timeout_s)
        self.wait_for("learn", self._learner_ready, c.ready_timeout_s)

    def _learner_ready(self) -> bool:
        listening = self.event("learn", "listening")
        return bool(listening) and _http_ok(self.learner_url + "/v1/status",
                                            self.operator_token)

    def phase_ui(self, redis_url: str) -> None:
        c = self.config
        self.ui_port = c.ui_port or free_port(c.host)  # Gradio cannot report a port-0 pick
        self.start("ui", rlhf_cmd(
            "ui", "--policy-target", self.grpc_target, "--host", c.host,
            "--port", str(self.ui_port), "--k", str(c.k), *self.extras["ui"]),
            env={"RLHF_UI_USERS": self.users, "RLHF_UI_AUTH_TOKEN": self.ui_token,
                 "RLHF_UI_REDIS_URL": redis_url,  # the task queue ("Next task")
                 # the UI's Dashboard talks to the learner's admin API
                 "RLHF_UI_LEARNER_URL": self.learner_url,
                 "RLHF_UI_LEARNER_TOKEN": self.operator_token,
                 # the built-in demo account may trigger iterations from the Dashboard
                 "RLHF_UI_OPERATORS": os.environ.get("RLHF_UI_OPERATORS") or (
                     "demo" if self.users == "demo:demo" else "")})
        self.wait_for("ui", lambda: _http_ok(self.ui_url), c.ready_timeout_s)

    @property
    def grpc_target(self) -> str:
        return f"{self.client_host}:{self.event('serve', 'listening')['grpc_port']}"

    @property
    def learner_url(self) -> str:
        return f"http://{self.client_host}:{self.event('learn', 'listening')['port']}"

    @property
    def ui_url(self) -> str:
        return f"http://{self.client_host}:{self.ui_port}/"

    def announce(self, redis_url: str) -> None:
        listening = self.event("serve", "listening") or {}
        http = listening.get("http_port")
        summary = {
            "event": "ready", "ui": self.ui_url, "grpc": self.grpc_target,
            "http": f"http://{self.client_host}:{http}/v1" if http else None,
            "learner": self.learner_url,
            "redis": redis_url if not self.config.redis_url else "(--redis-url)",
            "data_dir": str(self.data),
            "pids": {name: ch.pid for name, ch in self.children.items()}}
        token = " --token <operator token>" if self.operator_token else ""
        for line in (
                f"ranking UI     {summary['ui']}  (accounts: {account_names(self.users)})",
                f"policy gRPC    {summary['grpc']}",
                f"OpenAI HTTP    {summary['http']}",
                f"learner API    {summary['learner']}  (rlhf learner trigger --url "
                f"{summary['learner']}{token})",
                f"simulate       rlhf simulate --target {summary['grpc']} --token-file "
                f"{self.data / 'ui-token'}",
                f"redis          {summary['redis']}",
                f"data           {summary['data_dir']}", "Ctrl-C stops everything."):
            log.info("%s", line)
        write_line(json.dumps(summary))  # never interleaved with a child's line

    def shutdown(self) -> None:
        """Reverse start order; a second Ctrl-C skips the waiting."""
        for name in reversed(list(self.children)):
            rc = self.children[name].stop(self.config.stop_timeout_s,
                                          hurry=lambda: self.signals > 1)
            log.info("%s stopped (exit code %s)", name, rc)

    def run(self) -> int:
        try:
            self.write_ui_token()
            redis_url = self.phase_redis()
            self.phase_build()
            self.phase_serve_and_learn(redis_url)
            self.phase_ui(redis_url)
            self.announce(redis_url)
            self.wait_for("shutdown", lambda: False, None)
        except Stopped:
            return 0
        except PartFailed as exc:
            log.error("%s; stopping the rest", exc)
            return 1
        finally:
            self.shutdown()
        return 0  # unreachable: the wait above ends only by an exception


def main(argv: Sequence[str]) -> int:
    from rlhf.modeling import model_kind
    from rlhf.models import UnknownModel

    config, extras, verbose = parse_args(argv)
    try:
        model_kind(config.model)
    except UnknownModel as exc:
        sys.stderr.write(f"rlhf up: --model: {exc}\n")
        return 2
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s up: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # readiness polls are not news
    log.info("config: %s", settings.describe(config))
    launcher = Launcher(config, extras)
    previous = {sig: signal.signal(sig, launcher.on_signal)
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return launcher.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
