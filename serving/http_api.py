"""OpenAI-compatible HTTP face: pydantic wire models translated to and from ``PolicyService``.

``model`` may be the served base model name (the current adapter answers), ``"base"`` or a
loaded adapter version (the request is pinned to it). Extensions: ``top_k``, ``min_tokens``
and ``adapter_version`` (pins explicitly). Every rule about a valid request lives in the
service; this module only maps names, status codes and the streaming format.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.auth import Credentials
from serving.openapi import install as install_openapi
from serving.service import Code, GenerateInput, Generation, Info, PolicyService, ServiceError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
STATUS = {Code.INVALID_ARGUMENT: 400, Code.UNAUTHENTICATED: 401, Code.PERMISSION_DENIED: 403,
          Code.NOT_FOUND: 404, Code.FAILED_PRECONDITION: 409, Code.RESOURCE_EXHAUSTED: 429,
          Code.UNAVAILABLE: 503, Code.DEADLINE_EXCEEDED: 504, Code.INTERNAL: 500}
ERROR_TYPE = {401: "authentication_error", 403: "permission_error", 409: "conflict_error",
              429: "rate_limit_error", 503: "service_unavailable"}
FINISH = {"eos": "stop", "stop": "stop", "max_tokens": "length", "context": "length"}
_PARAMS = ("n", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "seed", "stop",
           "messages", "adapter_version")
_UNION_TAGS = {"str", "int", "float", "bool", "list", "none"}


class APIError(Exception):
    """An OpenAI-style error: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = ERROR_TYPE.get(self.status,
                              "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=headers)


def service_error(exc: ServiceError) -> APIError:
    message = exc.message.replace("max_new_tokens", "max_tokens").replace(
        "min_new_tokens", "min_tokens")
    head = message.split(" ", 1)[0].split("[", 1)[0]
    param = head if head in _PARAMS else None
    if "stop sequence" in message:
        param = "stop"
    elif message.startswith(("prompt is", "request too large")):
        param = "messages"
    elif exc.code is Code.NOT_FOUND:
        param = "adapter_version"
    return APIError(STATUS[exc.code], message, param, exc.code.value)


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode text ({exc.reason} at character {exc.start}); "
                         "send UTF-8 text") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]  # JSON may escape a lone surrogate: "\ud800"


def _whole(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_whole)]  # JSON Schema's integer: 3 and 3.0, not "3"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Wire):
    type: Literal["text"]
    text: Text


class ChatMessage(_Wire):
    role: Text
    content: Text | list[TextPart] | None = None


class StreamOptions(_Wire):
    include_usage: bool | None = None


class ChatRequest(_Wire):
    model: Text | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    n: Int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: Int | None = None
    stop: Text | list[Text] | None = None
    top_k: Int | None = None
    min_tokens: Int | None = None
    adapter_version: Text | None = None


def to_input(body: ChatRequest, adapter: str | None, request_id: str | None) -> GenerateInput:
    def text(content: str | list[TextPart] | None) -> str:
        return content if isinstance(content, str) else "\n".join(p.text for p in content or ())

    max_new = body.max_completion_tokens
    if None not in (max_new, body.max_tokens) and max_new != body.max_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens disagree; give one of them",
                       "max_completion_tokens", "invalid_value")
    return GenerateInput(
        messages=[("system" if m.role == "developer" else m.role, text(m.content))
                  for m in body.messages],
        n=body.n, max_new_tokens=body.max_tokens if max_new is None else max_new,
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
        min_new_tokens=body.min_tokens,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or ()),
        adapter_version=adapter, request_id=request_id)


def pinned_adapter(info: Info, body: ChatRequest) -> str | None:
    """The adapter version ``model``/``adapter_version`` pin the request to (None: current)."""
    model = body.model or ""
    from_model = model if model in info.loaded_adapter_versions else None
    if model and from_model is None and model != info.base_model:
        names = ", ".join([info.base_model, *info.loaded_adapter_versions])
        raise APIError(404, f"model {model!r} does not exist; available: {names}", "model",
                       "model_not_found")
    if body.adapter_version and from_model and body.adapter_version != from_model:
        raise APIError(400, f"model {model!r} and adapter_version {body.adapter_version!r} "
                       "disagree; give one of them", "adapter_version")
    return body.adapter_version or from_model


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def complete(request: Request, gen: Generation, head: dict[str, Any]) -> Response:
    texts: list[list[str]] = [[] for _ in range(gen.n)]
    finish: list[str | None] = [None] * gen.n
    tokens = [0] * gen.n

    async def collect() -> None:
        async with contextlib.aclosing(gen.events()) as stream:
            async for events in stream:
                for e in events:
                    texts[e.index].append(e.text)
                    tokens[e.index] = e.completion_tokens
                    finish[e.index] = FINISH.get(e.finish_reason or "")

    work, watch = asyncio.ensure_future(collect()), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            gen.cancel()
            work.cancel()
    if work.cancelled():
        return Response(status_code=499)  # the client went away; nobody reads this
    work.result()  # re-raises a ServiceError
    choices = [{"index": i, "message": {"role": "assistant", "content": "".join(texts[i])},
                "finish_reason": finish[i], "logprobs": None} for i in range(gen.n)]
    return JSONResponse({**head, "choices": choices,
                         "usage": usage(gen.prompt_tokens, sum(tokens))})


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def stream(gen: Generation, head: dict[str, Any], include_usage: bool
                 ) -> AsyncGenerator[str, None]:
    head = {**head, "object": "chat.completion.chunk"}

    def chunk(index: int, delta: dict[str, str], reason: str | None) -> str:
        return _sse({**head, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                          "finish_reason": reason}]})

    started: set[int] = set()
    tokens = [0] * gen.n
    try:
        async with contextlib.aclosing(gen.events()) as events:
            async for batch in events:
                for e in batch:
                    tokens[e.index] = e.completion_tokens
                    delta = {} if e.index in started else {"role": "assistant"}
                    started.add(e.index)
                    if e.text:
                        delta["content"] = e.text
                    if delta:
                        yield chunk(e.index, delta, None)
                    if e.finish_reason is not None:
                        yield chunk(e.index, {}, FINISH.get(e.finish_reason))
        if include_usage:
            yield _sse({**head, "choices": [], "usage": usage(gen.prompt_tokens, sum(tokens))})
        yield "data: [DONE]\n\n"
    except ServiceError as exc:
        yield _sse(service_error(exc).body())
    except Exception:  # the status line is sent: the error can only go into the stream
        log.exception("streaming a chat completion failed")
        yield _sse(INTERNAL_ERROR.body())


class EventStream(StreamingResponse):
    """SSE that cancels its generation however the response ends, even before it starts."""

    def __init__(self, gen: Generation, content: AsyncGenerator[str, None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.gen, self.content = gen, content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.gen.handle.done:
                self.gen.cancel()
            await self.content.aclose()  # runs the generator's cleanup (metrics) now


INTERNAL_ERROR = APIError(500, "internal server error: the request was not completed; the "
                          "server logged the cause", code="internal")


class JSONErrors:
    """The last line: an exception no handler took becomes the API's JSON 500 (logged once
    with its traceback), never Starlette's plain-text one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unhandled error answering %s %s", scope.get("method"),
                          scope.get("path"))
            if not started:
                await INTERNAL_ERROR.response()(scope, receive, send)


class Guard:
    """Bearer auth on /v1 and the body size limit, before FastAPI reads anything."""

    def __init__(self, app: ASGIApp, service: PolicyService, credentials: Credentials) -> None:
        self.app, self.service, self.credentials = app, service, credentials

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["path"].startswith("/v1") and not self.credentials.admits(
                headers.get("authorization")):
            reply = APIError(401, "missing or wrong API key: send 'Authorization: Bearer "
                             "<token>'", code="invalid_api_key")
            return await reply.response({"WWW-Authenticate": "Bearer"})(scope, receive, send)
        too_large = f"request body is larger than the {MAX_BODY_BYTES} byte limit"
        length = headers.get("content-length", "")
        if length.isascii() and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return await APIError(413, too_large).response()(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > MAX_BODY_BYTES:
                raise HTTPException(413, too_large)
            return message

        await self.app(scope, limited, send)


def _where(loc: tuple[Any, ...]) -> str:
    parts = [p for p in loc[1:] if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p))]
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = max(exc.errors(), key=lambda e: len(e["loc"]))  # the most specific one
    if first["type"] == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error')}", None
    where = _where(tuple(first["loc"]))
    if not where:
        return "request body must be a JSON object (Content-Type: application/json)", None
    got = first.get("input")
    shown = "" if first["type"] == "missing" else f" (got {json.dumps(got)[:80]})"
    return f"invalid value for '{where}': {first['msg']}{shown}", where


def create_app(service: PolicyService, credentials: Credentials | None = None) -> FastAPI:
    app = FastAPI(title="rlhf policy", docs_url=None, redoc_url=None)
    app.add_middleware(Guard, service=service,
                       credentials=credentials or Credentials(service.config.auth_token))
    app.add_middleware(JSONErrors)  # added last: the outermost of ours
    install_openapi(app, service.config)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return service_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return APIError(400, *_validation_message(exc), "invalid_value").response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message, cause = str(exc.detail), exc.__cause__
        if exc.status_code == 400 and cause is not None:  # FastAPI could not parse the body
            why = "nested too deeply" if isinstance(cause, RecursionError) else str(cause)
            message = f"request body is not valid JSON: {why}"
        return APIError(exc.status_code, message).response(exc.headers)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        info = service.info()
        adapter = pinned_adapter(info, body)
        gen = service.open(to_input(body, adapter, request.headers.get("x-request-id")),
                           api="http")
        head = {"id": f"chatcmpl-{gen.request_id}", "object": "chat.completion",
                "created": int(time.time()), "model": body.model or info.base_model,
                "system_fingerprint": gen.adapter_version, "adapter_version": gen.adapter_version}
        if not body.stream:
            return await complete(request, gen, head)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(gen, stream(gen, head, include_usage))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        info = service.info()
        names = [info.base_model, *info.loaded_adapter_versions]
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                            "owned_by": "rlhf"} for name in names]}

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        if not service.ready:
            return JSONResponse({"status": "draining" if service.draining else "loading"}, 503)
        info = service.info()
        body = {"status": "ok", "model": info.base_model,
                "adapter_version": info.current_adapter_version}
        follow = service.adapters.follow_state if service.adapters is not None else None
        if follow is not None:  # e.g. {"degraded": true, "detail": "degraded: registry ..."}
            body["adapter_status"] = follow.describe()
        return JSONResponse(body)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
