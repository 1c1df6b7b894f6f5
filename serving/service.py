"""The policy service both wire faces share: validation, prompt encoding, engine calls.

gRPC and HTTP servicers translate their wire messages into ``GenerateInput`` and
``ServiceError`` codes back into status codes; every rule about what a valid request is
lives here, once.
"""

from __future__ import annotations

import enum
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from rlhf.chat import chat_ids
from rlhf.contract import (
    MAX_TEMPERATURE,
    MAX_TOP_K,
    MIN_TEMPERATURE,
    ROLES,
    is_version_name,
    name_problem,
)
from rlhf.modeling import LoadedModel
from serving.adapters import AdapterManager, UnknownAdapter
from serving.config import ServingConfig
from serving.engine import (
    DeadlineExceeded,
    Engine,
    EngineStopped,
    Event,
    QueueFull,
    RequestHandle,
    Sampling,
)
from serving.metrics import ServingMetrics

SERVER_VERSION = "0.1.0"
_REQUEST_ID_MAX = 128
# Sampling ranges (README "Sampling parameters") live in rlhf.contract: a ranking records
# the sampling of its candidates, and the Feedback door checks them against the same ones.


class Code(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    FAILED_PRECONDITION = "failed_precondition"  # e.g. a ranking for a task already done
    NOT_FOUND = "not_found"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL = "internal"


class ServiceError(Exception):
    """A status code, a message for the caller and, when one field is at fault, its name
    (``candidates[2].rank``), carried to both wires without parsing the message."""

    def __init__(self, code: Code, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


def _invalid(message: str) -> ServiceError:
    return ServiceError(Code.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class GenerateInput:
    """A wire-neutral Generate request; ``None`` means "not given, use the default"."""

    messages: Sequence[tuple[str, str]] | None = None
    prompt: str | None = None
    n: int | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    min_new_tokens: int | None = None
    adapter_version: str | None = None
    request_id: str | None = None
    timeout_s: float | None = None


@dataclass(frozen=True)
class Info:
    base_model: str
    current_adapter_version: str
    loaded_adapter_versions: list[str]
    max_n: int
    max_new_tokens: int
    default_max_new_tokens: int
    context_length: int
    max_batch_size: int
    max_queue: int
    server_version: str = SERVER_VERSION


@dataclass
class Generation:
    """An accepted request: iterate for event lists; ``cancel`` when the caller goes away."""

    request_id: str
    n: int
    prompt_tokens: int
    adapter_version: str
    seeds: list[int]
    handle: RequestHandle
    metrics: ServingMetrics
    api: str
    _ttft_seen: bool = field(default=False)

    async def events(self) -> AsyncIterator[list[Event]]:
        code = "ok"
        try:
            async for events in self.handle:
                if not self._ttft_seen:
                    self._ttft_seen = True
                    self.metrics.ttft.observe(time.monotonic() - self.handle.submitted_at)
                yield events
        except DeadlineExceeded as exc:
            code = "deadline_exceeded"
            raise ServiceError(Code.DEADLINE_EXCEEDED, str(exc)) from exc
        except EngineStopped as exc:
            code = "unavailable"
            raise ServiceError(Code.UNAVAILABLE, str(exc)) from exc
        except Exception as exc:
            code = "internal"
            raise ServiceError(Code.INTERNAL, f"generation failed: {exc}") from exc
        finally:
            if not self.handle.done:
                self.handle.cancel()
                code = code if code != "ok" else "cancelled"
            self.metrics.requests.labels(api=self.api, code=code).inc()

    def cancel(self) -> None:
        self.handle.cancel()


class PolicyService:
    """Owns the engine once the model is loaded; until then every call is UNAVAILABLE."""

    def __init__(self, config: ServingConfig, metrics: ServingMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or ServingMetrics()
        self.model: LoadedModel | None = None
        self.engine: Engine | None = None
        self.adapters: AdapterManager | None = None
        self.draining = False

    # -- lifecycle -----------------------------------------------------------------------

    def attach(self, model: LoadedModel, adapters: AdapterManager, engine: Engine) -> None:
        self.model, self.adapters, self.engine = model, adapters, engine
        self.metrics.set_adapters(adapters.current, adapters.loaded())
        self.metrics.ready.set(1)

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining

    def drain(self) -> None:
        """Shutting down: health checks fail, new requests get UNAVAILABLE."""
        self.draining = True
        self.metrics.ready.set(0)
        if self.engine is not None:
            self.engine.close_intake()

    def _require(self) -> tuple[LoadedModel, Engine, AdapterManager]:
        if self.model is None or self.engine is None or self.adapters is None:
            raise ServiceError(Code.UNAVAILABLE, "the model is still loading; retry shortly")
        return self.model, self.engine, self.adapters

    # -- calls ---------------------------------------------------------------------------

    def info(self) -> Info:
        model, _, adapters = self._require()
        c = self.config
        return Info(base_model=model.name, current_adapter_version=adapters.current,
                    loaded_adapter_versions=adapters.loaded(), max_n=c.max_n,
                    max_new_tokens=c.max_new_tokens,
                    default_max_new_tokens=c.default_max_new_tokens,
                    context_length=model.context_length, max_batch_size=c.max_batch_size,
                    max_queue=c.max_queue)

    def open(self, req: GenerateInput, api: str) -> Generation:
        """Validate and queue; raises ServiceError (nothing is queued then)."""
        try:
            return self._open(req, api)
        except ServiceError as exc:
            self.metrics.requests.labels(api=api, code=exc.code.value).inc()
            raise

    def _open(self, req: GenerateInput, api: str) -> Generation:
        if self.draining:
            raise ServiceError(Code.UNAVAILABLE, "the server is shutting down; retry on "
                               "another replica")
        model, engine, _ = self._require()
        sampling, n = self._sampling(req)
        adapter = _check_adapter_name(req.adapter_version)
        request_id = _check_request_id(req.request_id)
        prompt_ids = self._encode(model, req)
        deadline = None
        if req.timeout_s is not None:
            if not req.timeout_s > 0:
                raise _invalid("timeout must be positive")
            deadline = time.monotonic() + req.timeout_s
        try:
            handle = engine.submit(request_id, prompt_ids, n, sampling, adapter, deadline)
        except UnknownAdapter:
            raise ServiceError(Code.NOT_FOUND, f"adapter version {adapter!r} is not loaded; "
                               f"loaded: {', '.join(self.adapters.loaded())}") from None
        except QueueFull as exc:
            raise ServiceError(Code.RESOURCE_EXHAUSTED,
                               f"server busy: {exc}; retry with backoff") from None
        except EngineStopped as exc:
            raise ServiceError(Code.UNAVAILABLE, str(exc)) from None
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        return Generation(request_id, n, len(prompt_ids), handle.adapter, handle.seeds, handle,
                          self.metrics, api)

    def _sampling(self, req: GenerateInput) -> tuple[Sampling, int]:
        c = self.config
        n = 1 if req.n is None else req.n
        if not 1 <= n <= c.max_n:
            raise _invalid(f"n must be between 1 and {c.max_n}, got {n}")
        max_new = c.default_max_new_tokens if req.max_new_tokens is None else req.max_new_tokens
        if not 1 <= max_new <= c.max_new_tokens:
            raise _invalid(f"max_new_tokens must be between 1 and {c.max_new_tokens}, "
                           f"got {max_new}")
        min_new = req.min_new_tokens or 0
        if not 0 <= min_new <= max_new:
            raise _invalid(f"min_new_tokens must be between 0 and max_new_tokens ({max_new}), "
                           f"got {min_new}")
        temperature = 1.0 if req.temperature is None else float(req.temperature)
        if not (temperature == 0 or (math.isfinite(temperature)
                                     and MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE)):
            raise _invalid(f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE:g} and "
                           f"{MAX_TEMPERATURE:g}, got {temperature:g}")
        top_p = 1.0 if req.top_p is None else float(req.top_p)
        if not (math.isfinite(top_p) and 0 < top_p <= 1):
            raise _invalid(f"top_p must be in (0, 1], got {top_p:g}")
        top_k = 0 if req.top_k is None else req.top_k
        if not 0 <= top_k <= MAX_TOP_K:
            raise _invalid(f"top_k must be between 0 and {MAX_TOP_K} (0 = no limit), "
                           f"got {top_k}")
        if req.seed is not None and not 0 <= req.seed < 2**64:
            raise _invalid(f"seed must be in [0, 2^64), got {req.seed}")
        stop = tuple(req.stop)
        if len(stop) > c.max_stop_sequences:
            raise _invalid(f"at most {c.max_stop_sequences} stop sequences, got {len(stop)}")
        if any(not s for s in stop):
            raise _invalid("stop sequences must not be empty strings")
        for i, s in enumerate(stop):
            _check_text(f"stop[{i}]", s)
        return Sampling(max_new, temperature, top_p, top_k, req.seed, stop, min_new), n

    def _encode(self, model: LoadedModel, req: GenerateInput) -> list[int]:
        has_messages = bool(req.messages)
        has_prompt = bool(req.prompt)
        if has_messages == has_prompt:
            raise _invalid("give exactly one of messages (a non-empty list) or prompt")
        size = sum(len(s) for s in req.stop)
        if has_messages:
            assert req.messages is not None
            for i, (role, content) in enumerate(req.messages):
                if role not in ROLES:
                    raise _invalid(f"messages[{i}].role must be one of {', '.join(ROLES)}, "
                                   f"got {role!r}")
                _check_text(f"messages[{i}].content", content)
                if not content.strip():
                    raise _invalid(f"messages[{i}].content is empty")
                size += len(content)
        else:
            _check_text("prompt", req.prompt or "")
            size += len(req.prompt or "")
        if size > self.config.max_request_chars:
            raise _invalid(f"request too large: {size} characters of text, limit "
                           f"{self.config.max_request_chars}")
        tok = model.tokenizer
        if has_messages:
            try:
                ids = chat_ids(tok, list(req.messages or ()))
            except Exception as exc:  # templates raise on e.g. role order they don't allow
                raise _invalid(f"the model's chat template rejected the messages: {exc}") \
                    from None
        else:
            ids = list(tok(req.prompt or "")["input_ids"])
        if len(ids) >= model.context_length:
            raise _invalid(f"prompt is {len(ids)} tokens; the context window is "
                           f"{model.context_length} (leave room for at least one new token)")
        return ids


def _check_text(name: str, text: str) -> None:
    """Text must be encodable as UTF-8: a lone surrogate (JSON "\\ud800") is not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _invalid(f"{name} is not valid Unicode text ({exc.reason} at character "
                       f"{exc.start}); send UTF-8 text") from None


def _check_adapter_name(version: str | None) -> str | None:
    if not version:
        return None
    if not is_version_name(version):
        raise _invalid(f"adapter_version {version!r} is not a valid version name "
                       "(letters, digits, '.', '_', '-'; at most 64)")
    return version


def _check_request_id(request_id: str | None) -> str:
    if not request_id:
        return uuid.uuid4().hex
    problem = name_problem(request_id, _REQUEST_ID_MAX)
    if problem:
        raise _invalid(f"request_id {problem} (at most {_REQUEST_ID_MAX} printable characters, "
                       "no leading or trailing whitespace)")
    return request_id
