"""`rlhf serve`: one process with the engine, the gRPC server and the HTTP face.

Phases: (1) listen at once, health NOT_SERVING; (2) load the model in a worker thread and
start the engine (and, with --redis-url, make sure the comparisons stream's consumer group
exists; with --adapter-store too, load the adapter the registry resolves to and follow it,
serving/registry.py: until that first round succeeded, which waits for a registry that is
down, the process is not ready), then accept requests, health SERVING, /healthz ok and
the "ready" line; (3) run until SIGTERM/SIGINT; (4) shut down gracefully: health
NOT_SERVING, refuse new requests, let running streams finish within the grace period,
stop the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.exceptions import RedisError

from rlhf.modeling import LoadedModel, load_model
from rlhf.v1 import feedback_pb2, feedback_pb2_grpc, policy_pb2, policy_pb2_grpc
from serving.adapters import AdapterManager
from serving.auth import Credentials
from serving.canary import CANARY_PROMPT
from serving.config import ServingConfig
from serving.engine import Engine
from serving.feedback import FeedbackService
from serving.feedback_api import FeedbackServicer, feedback_router
from serving.grpc_decode import DecodeGuard
from serving.grpc_server import BearerAuthInterceptor, PolicyServicer
from serving.http_api import create_app
from serving.http_protocol import JSONErrorsH11Protocol
from serving.registry import RegistryFollower
from serving.service import PolicyService

log = logging.getLogger(__name__)

POLICY_SERVICE = policy_pb2.DESCRIPTOR.services_by_name["Policy"].full_name
FEEDBACK_SERVICE = feedback_pb2.DESCRIPTOR.services_by_name["Feedback"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside our event loop: the process's signal handling stays ours."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Running:
    grpc_server: grpc.aio.Server
    grpc_port: int
    http: _EmbeddedUvicorn | None
    http_task: asyncio.Task | None
    http_port: int | None
    health: health.aio.HealthServicer
    health_names: tuple[str, ...] = ("", POLICY_SERVICE)
    feedback: FeedbackService | None = None
    follower: RegistryFollower | None = None


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


async def _phase_listen(config: ServingConfig, service: PolicyService,
                        feedback: FeedbackService | None = None,
                        credentials: Credentials | None = None) -> Running:
    credentials = credentials or Credentials.from_config(config)
    interceptors: list[grpc.aio.ServerInterceptor] = (
        [BearerAuthInterceptor(credentials)] if credentials.gated else [])
    interceptors.append(DecodeGuard())  # last: every method sees a request that decoded
    server = grpc.aio.server(interceptors=interceptors,
                             options=[("grpc.max_receive_message_length", 8 << 20)])
    policy_pb2_grpc.add_PolicyServicer_to_server(PolicyServicer(service), server)
    names: tuple[str, ...] = ("", POLICY_SERVICE)
    if feedback is not None:
        feedback_pb2_grpc.add_FeedbackServicer_to_server(
            FeedbackServicer(feedback, credentials), server)
        names += (FEEDBACK_SERVICE,)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in names:
        await health_servicer.set(name, NOT_SERVING)
    reflection.enable_server_reflection(
        (*names[1:], health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.grpc_port}"
    if config.tls_cert:
        creds = grpc.ssl_server_credentials(
            [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())])
        grpc_port = server.add_secure_port(address, creds)
    else:
        grpc_port = server.add_insecure_port(address)
    await server.start()

    http = http_task = http_port = None
    if config.http_port >= 0:
        sock = _bind(config.host, config.http_port)
        http_port = sock.getsockname()[1]
        app = create_app(service, credentials)
        if feedback is not None:
            app.include_router(feedback_router(feedback, credentials))
        http = _EmbeddedUvicorn(uvicorn.Config(app, http=JSONErrorsH11Protocol,
                                               log_level="warning", lifespan="off",
                                               access_log=False))
        http_task = asyncio.create_task(http.serve(sockets=[sock]))
    return Running(server, grpc_port, http, http_task, http_port, health_servicer, names,
                   feedback)


def _load_engine(config: ServingConfig, service: PolicyService) -> tuple[LoadedModel, Engine]:
    """Model, adapters and a started engine; the service gets them once ready."""
    loaded = load_model(config.model, device=config.device, dtype=config.dtype,
                        load_in_4bit=config.load_in_4bit)
    canary_ids = loaded.tokenizer(CANARY_PROMPT, add_special_tokens=False)["input_ids"]
    adapters = AdapterManager(loaded.model, keep_versions=config.keep_versions,
                              canary_prompt_ids=canary_ids)
    if config.adapter:
        version = config.adapter_version or Path(config.adapter).name
        adapters.load(version, config.adapter)
        adapters.set_current(version)
    engine = Engine(loaded.tokenizer, adapters=adapters, eos_token_ids=loaded.eos_token_ids,
                    context_length=loaded.context_length,
                    max_batch_size=config.max_batch_size, max_queue=config.max_queue,
                    threads=config.threads, on_step=service.metrics.on_step)
    engine.start()
    log.info("model loaded and engine started")
    return loaded, engine


async def _prepare_feedback(feedback: FeedbackService | None) -> None:
    """Create the learner's consumer group now; a Redis that is down is not fatal (each
    submission then fails with UNAVAILABLE, and the first stored one makes the group)."""
    if feedback is None:
        return
    try:
        made = await feedback.store.ensure_group()
        log.info("feedback streams %s: consumer group %s %s",
                 ", ".join(feedback.store.streams()), feedback.store.group,
                 "created" if made else "exists")
    except RedisError as exc:
        log.warning("feedback store unreachable at start (%s); submissions will fail with "
                    "UNAVAILABLE until it answers", exc)


async def _start_follower(config: ServingConfig, service: PolicyService, base_model: str,
                          engine: Engine) -> RegistryFollower | None:
    """With --adapter-store and --redis-url: one follower round (the registry's current
    adapter, or the newest older one that verifies, is loaded), then follow it. A registry
    that is down delays readiness until it answers; it is retried every poll."""
    if not (config.adapter_store and config.redis_url):
        return None
    import redis

    adapters = engine.adapters

    def on_change() -> None:
        service.metrics.set_adapters(adapters.current, adapters.loaded())
        service.metrics.set_follow(adapters.follow_state)

    follower = RegistryFollower(
        redis.Redis.from_url(config.redis_url, socket_connect_timeout=2.0,
                             socket_timeout=max(5.0, 4 * config.registry_poll_s)),
        config.adapter_store, base_model, engine, adapters,
        poll_s=config.registry_poll_s, metrics_registry=service.metrics.registry,
        on_change=on_change)
    warned = False
    while True:
        try:
            await asyncio.to_thread(follower.sync)
            break
        except Exception as exc:  # RedisError above all; retried like the follower does
            if not warned:
                log.warning("adapter registry round failed at start (%s: %s); not ready "
                            "until the registry answers and its adapter is loaded",
                            type(exc).__name__, exc)
                warned = True
            await asyncio.sleep(config.registry_poll_s)
    if warned:
        log.info("adapter registry answered; serving %s", adapters.current)
    follower.start()
    return follower


async def _phase_load(config: ServingConfig, service: PolicyService, run: Running) -> Engine:
    (loaded, engine), _ = await asyncio.gather(asyncio.to_thread(_load_engine, config, service),
                                               _prepare_feedback(run.feedback))
    run.follower = await _start_follower(config, service, loaded.name, engine)
    if run.feedback is not None and run.follower is not None:
        follower = run.follower  # a version this replica refused is not a ranking's source
        run.feedback.versions.refused = lambda: tuple(follower.refused.copy())  # atomic
    service.attach(loaded, engine.adapters, engine)  # requests are accepted from here on
    service.metrics.set_follow(engine.adapters.follow_state)
    for name in run.health_names:
        await run.health.set(name, SERVING)
    log.info("serving %s", service.info().base_model)
    return engine


async def _phase_shutdown(config: ServingConfig, service: PolicyService, run: Running,
                          engine: Engine | None) -> None:
    """Refuse new work, then health NOT_SERVING; running and queued requests finish within
    the grace. The order matters: a client that saw NOT_SERVING must find new Generate calls
    refused, so the refusal starts first, before anything awaits."""
    service.drain()  # /healthz 503, new Generate calls get UNAVAILABLE
    await run.health.enter_graceful_shutdown()
    if run.follower is not None:
        await asyncio.to_thread(run.follower.stop)
    if engine is not None:
        deadline = asyncio.get_running_loop().time() + config.shutdown_grace_s
        while asyncio.get_running_loop().time() < deadline:
            stats = engine.stats()
            if stats.running_rows == 0 and stats.waiting_requests == 0:
                break
            await asyncio.sleep(0.05)
    await run.grpc_server.stop(1.0)
    if run.http is not None and run.http_task is not None:
        run.http.should_exit = True
        await run.http_task
    if engine is not None:
        await asyncio.to_thread(engine.stop, 1.0)
    if run.feedback is not None:
        await run.feedback.store.close()


def _log_labeler_binding(credentials: Credentials, config: ServingConfig) -> None:
    if not config.redis_url:
        return
    if credentials.binds_labelers:
        log.info("feedback: labelers are bound to credentials (ui token: %s, labeler tokens: "
                 "%d)", "yes" if credentials.ui_token else "no",
                 len(set(credentials.labeler_hashes.values())))
    elif credentials.gated:
        log.warning("feedback: only --auth-token is set, which proves no labeler: every "
                    "ranking is refused until --ui-token or --labeler-tokens is given")
    else:
        log.warning("feedback: no credentials configured: labeler ids are taken from the "
                    "records as sent and stamped LABELER_AUTH_NONE (unauthenticated)")


async def serve(config: ServingConfig) -> None:
    service = PolicyService(config)
    credentials = Credentials.from_config(config)  # a bad --labeler-tokens file stops here
    _log_labeler_binding(credentials, config)
    feedback = FeedbackService.from_config(config) if config.redis_url else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    run = await _phase_listen(config, service, feedback, credentials)
    sys.stdout.write(json.dumps({"event": "listening", "grpc_port": run.grpc_port,
                                 "http_port": run.http_port}) + "\n")
    sys.stdout.flush()
    load = asyncio.create_task(_phase_load(config, service, run))
    engine = None
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({load, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if load in done:
        engine = load.result()  # a failed load raises here and the process exits non-zero
        sys.stdout.write(json.dumps({"event": "ready"}) + "\n")
        sys.stdout.flush()
        await waiter
    else:
        load.cancel()
    log.info("shutting down")
    await _phase_shutdown(config, service, run, engine)
