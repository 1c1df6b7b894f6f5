"""gRPC face of the policy: servicers that translate wire <-> service, and the auth interceptor."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from rlhf.v1 import policy_pb2, policy_pb2_grpc
from serving.auth import Credentials
from serving.service import Code, GenerateInput, PolicyService, ServiceError

STATUS = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Code.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Code.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Code.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
}
FINISH = {
    "eos": policy_pb2.FINISH_REASON_EOS,
    "max_tokens": policy_pb2.FINISH_REASON_MAX_TOKENS,
    "stop": policy_pb2.FINISH_REASON_STOP,
    "context": policy_pb2.FINISH_REASON_CONTEXT,
}
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/",)


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v
    return None


def to_input(request: policy_pb2.GenerateRequest, context: grpc.aio.ServicerContext
             ) -> GenerateInput:
    s = request.sampling
    remaining = context.time_remaining()
    return GenerateInput(
        messages=[(m.role, m.content) for m in request.messages] or None,
        prompt=request.prompt or None,
        n=request.n or None,
        max_new_tokens=s.max_new_tokens or None,
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None,
        stop=list(s.stop),
        min_new_tokens=s.min_new_tokens,
        adapter_version=request.adapter_version or None,
        request_id=request.request_id or _metadata(context, "x-request-id"),
        timeout_s=remaining if remaining is not None else None,
    )


class PolicyServicer(policy_pb2_grpc.PolicyServicer):
    def __init__(self, service: PolicyService) -> None:
        self.service = service

    async def Generate(self, request: policy_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[policy_pb2.GenerateChunk]:
        try:
            gen = self.service.open(to_input(request, context), api="grpc")
            prompt_tokens = gen.prompt_tokens
            async for events in gen.events():
                for e in events:
                    yield policy_pb2.GenerateChunk(
                        request_id=gen.request_id, index=e.index, text=e.text,
                        finish_reason=FINISH.get(e.finish_reason or "", 0),
                        prompt_tokens=prompt_tokens, completion_tokens=e.completion_tokens,
                        adapter_version=gen.adapter_version, seed=gen.seeds[e.index])
        except ServiceError as exc:
            await context.abort(STATUS[exc.code], exc.message)

    async def GetInfo(self, request: policy_pb2.GetInfoRequest,
                      context: grpc.aio.ServicerContext) -> policy_pb2.ServerInfo:
        try:
            info = self.service.info()
        except ServiceError as exc:
            await context.abort(STATUS[exc.code], exc.message)
        return policy_pb2.ServerInfo(
            base_model=info.base_model, current_adapter_version=info.current_adapter_version,
            loaded_adapter_versions=info.loaded_adapter_versions, max_n=info.max_n,
            max_new_tokens=info.max_new_tokens,
            default_max_new_tokens=info.default_max_new_tokens,
            context_length=info.context_length, max_batch_size=info.max_batch_size,
            max_queue=info.max_queue, server_version=info.server_version)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Require a known ``authorization: Bearer <token>`` (serving.auth) on every method but
    health checks."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if details.method.startswith(PUBLIC_PREFIXES) or handler is None:
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if isinstance(given, str) and self.credentials.admits(given):
            return handler
        return _deny(handler, "missing or wrong bearer token in the 'authorization' metadata")


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def abort(request, context):  # type: ignore[no-untyped-def]
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request, context):  # type: ignore[no-untyped-def]
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)
