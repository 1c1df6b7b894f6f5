"""The operator's HTTP API of the learner: trigger and watch iterations.

- ``POST /v1/iterations``      start one (409 while one runs) -> {"id": ...}
- ``GET  /v1/iterations/{id}`` phase, progress, metrics of one
- ``GET  /v1/iterations``      history (finished ones from Redis, plus the running one)
- ``GET  /v1/status``          running?, dataset size, current adapter, last iteration,
                               process count (torchrun ranks)
- ``GET  /v1/dashboard``       what the operator dashboard shows (learner.dashboard): metrics
                               per iteration, queue depth, comparisons per labeler, adapter
                               versions; 503 while Redis is unreachable
- ``GET  /v1/adapters``        registered versions and the current one
- ``GET  /v1/adapters/{v}``    one version's manifest
- ``POST /v1/adapters/{v}/promote`` (or ``/rollback``)  make it current on every replica
- ``POST /v1/tasks``           queue a JSONL body of tasks for labelers (rlhf.tasks, as
                               `rlhf tasks load`; all or nothing, 400 naming line and field)

Iterations run in one worker thread (``Runner``), so the API answers while one trains.
With a token configured every route wants ``Authorization: Bearer <token>`` (else 401),
the OpenAPI document ``GET /openapi.json`` included; nothing is public. There is no
``/docs`` page (a browser could not send the token, and it would need a CDN). The OpenAPI
document lists the codes each route really answers: 400 for a bad query value, 401, 404
for an unknown iteration or version, 409 (an iteration already runs, a version fails
verification), 503 while Redis is unreachable; every error body is ``{"detail": "..."}``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import asdict
from typing import Any

import redis
from fastapi import Depends, FastAPI, HTTPException, Query, Request

from learner.admin_errors import CONFLICT, NOT_FOUND, ErrorBody, install_errors_and_openapi
from learner.dashboard import Dashboard
from learner.iteration import Learner, Progress
from rlhf import adapter_store, tasks
from rlhf.auth import bearer_matches
from rlhf.comparisons import STREAM

log = logging.getLogger(__name__)


class Busy(RuntimeError):
    """An iteration is already running."""


class Runner:
    """Starts iterations on a worker thread, one at a time, and remembers this process's."""

    def __init__(self, learner: Learner) -> None:
        self.learner = learner
        self.runs: dict[str, Progress] = {}
        self.current: Progress | None = None
        self.thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.stream_seen = len(learner.dataset)  # stream length at the last trigger

    @property
    def running(self) -> bool:
        return self.current is not None and self.current.status == "running"

    def trigger(self) -> Progress:
        """Start an iteration now, or raise ``Busy``."""
        with self._lock:
            if self.running:
                raise Busy(f"iteration {self.current.id} is running")  # type: ignore[union-attr]
            self.stream_seen = int(self.learner.client.xlen(STREAM))
            progress = Progress(self.learner.new_id())
            self.runs[progress.id] = self.current = progress
            self.thread = threading.Thread(target=self._work, args=(progress,),
                                           name=f"iteration-{progress.id}", daemon=True)
            self.thread.start()
            return progress

    def _work(self, progress: Progress) -> None:
        with contextlib.suppress(Exception):  # run records it (status failed) and logs it
            self.learner.run(progress)

    def new_comparisons(self) -> int:
        """Entries added to the stream since the last trigger."""
        return int(self.learner.client.xlen(STREAM)) - self.stream_seen

    def maybe_auto_trigger(self, after: int) -> Progress | None:
        if after <= 0 or self.running or self.new_comparisons() < after:
            return None
        try:
            return self.trigger()
        except Busy:
            return None

    def get(self, iteration_id: str) -> dict[str, Any] | None:
        if iteration_id in self.runs:
            return self.runs[iteration_id].to_dict()
        return next((r for r in self.learner.history() if r.get("id") == iteration_id), None)

    def history(self) -> list[dict[str, Any]]:
        done = self.learner.history()
        if self.running:
            done.append(self.current.to_dict())  # type: ignore[union-attr]
        return done

    def status(self) -> dict[str, Any]:
        history = self.learner.history()
        return {"running": self.running,
                "iteration": self.current.to_dict() if self.running else None,  # type: ignore[union-attr]
                "dataset_size": len(self.learner.dataset),
                "new_comparisons": self.new_comparisons(),
                "current_adapter": adapter_store.current(self.learner.client),
                "base_model": self.learner.loaded.name,
                "processes": self.learner.cluster.world,  # ranks of a torchrun learner
                "last_iteration": history[-1] if history else None}

    def dashboard(self, board: Dashboard, limit: int) -> dict[str, Any]:
        running = self.current.to_dict() if self.running else None  # type: ignore[union-attr]
        history = self.learner.history()  # read after: a run that just ended is in here
        if running is not None and any(h.get("id") == running["id"] for h in history):
            running = None
        return board.snapshot(history, running, limit)

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)


def _auth(token: str):
    """A dependency that demands ``Authorization: Bearer <token>`` when a token is set."""

    def check(request: Request) -> None:
        if not token:
            return
        if not bearer_matches(request.headers.get("authorization"), token):
            raise HTTPException(401, "missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    return check


def create_app(runner: Runner, admin_token: str = "") -> FastAPI:
    app = FastAPI(title="rlhf learner admin", dependencies=[Depends(_auth(admin_token))],
                  openapi_url=None, docs_url=None, redoc_url=None)
    install_errors_and_openapi(app, bool(admin_token))

    @app.post("/v1/iterations", status_code=202, responses=CONFLICT)
    def trigger() -> dict[str, Any]:
        try:
            progress = runner.trigger()
        except Busy as exc:
            raise HTTPException(409, str(exc)) from None
        return {"id": progress.id, "status": progress.status}

    @app.get("/v1/iterations/{iteration_id}", responses=NOT_FOUND)
    def get_iteration(iteration_id: str) -> dict[str, Any]:
        found = runner.get(iteration_id)
        if found is None:
            raise HTTPException(404, f"no iteration {iteration_id!r}")
        return found

    @app.get("/v1/iterations")
    def history() -> dict[str, Any]:
        return {"iterations": runner.history()}

    @app.get("/v1/status")
    def status() -> dict[str, Any]:
        return runner.status()

    board = Dashboard(runner.learner.client, runner.learner.dataset,
                      runner.learner.demonstration_dataset)

    @app.get("/v1/dashboard")
    def dashboard(limit: int = Query(100, ge=1, le=10_000)) -> dict[str, Any]:
        try:
            return runner.dashboard(board, limit)
        except redis.RedisError as exc:
            raise HTTPException(503, f"Redis is unreachable: {exc}") from None

    @app.post("/v1/tasks", responses={400: {"model": ErrorBody, "description": "a bad task "
                                            "or an id queued already: nothing was loaded"}})
    async def load_tasks(request: Request, overlap_share: float = Query(0.1, ge=0, le=1),
                         overlap_labelers: int = Query(2, ge=2, le=9)) -> dict[str, Any]:
        try:
            text = (await request.body()).decode("utf-8")
            queued = tasks.parse_lines(text.splitlines(), overlap_share, overlap_labelers)
            loaded = tasks.load(runner.learner.client, queued)
        except UnicodeDecodeError:
            raise HTTPException(400, "the body must be UTF-8 JSONL, one task a line") from None
        except tasks.TaskError as exc:
            raise HTTPException(400, f"{exc}; nothing was loaded") from None
        return {"loaded": loaded, "golden": sum(t.is_golden for t in queued),
                "overlapped": sum(t.wanted > 1 for t in queued)}

    _adapter_routes(app, runner.learner)
    return app


def _adapter_routes(app: FastAPI, learner: Learner) -> None:
    """The same operations as `rlhf adapters`, for operators who drive the learner's API."""
    client = learner.client

    @app.get("/v1/adapters")
    def adapters() -> dict[str, Any]:
        now = adapter_store.current(client)
        rows = []
        for version in adapter_store.list_versions(client):
            m = adapter_store.get_manifest(client, version)
            rows.append({"version": version, "current": version == now,
                         "parent": m.parent if m else None,
                         "created_at": m.created_at if m else None})
        return {"current": now, "versions": rows}

    @app.get("/v1/adapters/{version}", responses=NOT_FOUND)
    def adapter(version: str) -> dict[str, Any]:
        manifest = adapter_store.get_manifest(client, version)
        if manifest is None:
            raise HTTPException(404, f"adapter version {version!r} is not registered")
        return asdict(manifest)

    def switch(version: str) -> dict[str, Any]:
        try:
            previous = adapter_store.switch_current(client, version, learner.cfg.adapter_store)
        except KeyError:
            raise HTTPException(404, f"adapter version {version!r} is not registered") from None
        except adapter_store.AdapterRejected as exc:
            raise HTTPException(409, f"refusing {version}: {exc}") from None
        return {"current": version, "previous": previous}

    app.post("/v1/adapters/{version}/promote", responses={**NOT_FOUND, **CONFLICT})(switch)
    app.post("/v1/adapters/{version}/rollback", responses={**NOT_FOUND, **CONFLICT})(switch)
