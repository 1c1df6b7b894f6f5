"""Requests that are not valid protobuf get INVALID_ARGUMENT, not UNKNOWN and a traceback.

grpc calls a method's request deserializer before any servicer code runs; when it raises
(protobuf refuses a ``string`` field that is not UTF-8, or bytes that are not a message),
grpc answers UNKNOWN with the exception's class in the message and logs a traceback for
every such request. ``DecodeGuard`` wraps each method's deserializer so that it never
raises: it hands the method an ``Undecodable`` instead, which the wrapped method turns into
INVALID_ARGUMENT naming the field (``invalid_utf8_field`` walks the wire format).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request whose bytes did not decode; ``message`` says why."""

    message: str


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]  # IndexError on truncated input: the caller treats it as corrupt
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def invalid_utf8_field(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """The path (``messages[1].content``) of the first string field of ``data`` whose bytes
    are not UTF-8; None when there is none or the bytes are not parseable at all."""
    pos, seen = 0, {}
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire = key >> 3, key & 7
            if wire == _VARINT:
                _, pos = _varint(data, pos)
                continue
            if wire in (_I64, _I32):
                pos += 8 if wire == _I64 else 4
                continue
            if wire != _LEN:
                return None
            length, pos = _varint(data, pos)
            chunk, pos = data[pos:pos + length], pos + length
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            name = prefix + field.name
            if field.is_repeated:
                seen[number] = seen.get(number, -1) + 1
                name += f"[{seen[number]}]"
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    chunk.decode("utf-8")
                except UnicodeDecodeError:
                    return name
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                found = invalid_utf8_field(field.message_type, chunk, name + ".")
                if found is not None:
                    return found
    except IndexError:
        return None
    return None


def _safe_deserializer(decode: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    message_type = getattr(decode, "__self__", None)
    descriptor = getattr(message_type, "DESCRIPTOR", None)
    type_name = descriptor.full_name if descriptor is not None else "the request message"

    def safe(data: bytes) -> Any:
        try:
            return decode(data)
        except Exception:
            field = invalid_utf8_field(descriptor, data) if descriptor is not None else None
            why = (f"field {field} is not valid UTF-8 (protobuf string fields must be)"
                   if field else "the bytes are not valid protobuf")
            return Undecodable(f"request is not a valid {type_name}: {why}")

    return safe


async def _refuse(context: grpc.aio.ServicerContext, request: Undecodable) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def _wrap_unary_request(behavior: Callable, streaming_response: bool) -> Callable:
    if streaming_response and inspect.isasyncgenfunction(behavior):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
            if isinstance(request, Undecodable):
                await _refuse(context, request)
            async for item in behavior(request, context):
                yield item
        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await _refuse(context, request)
        return await behavior(request, context)
    return unary


def _wrap_stream_request(behavior: Callable, streaming_response: bool) -> Callable:
    def checked(requests: AsyncIterator, context: grpc.aio.ServicerContext) -> AsyncIterator:
        async def gen() -> AsyncIterator:
            async for request in requests:
                if isinstance(request, Undecodable):
                    await _refuse(context, request)
                yield request
        return gen()

    if streaming_response and inspect.isasyncgenfunction(behavior):
        async def stream(requests: AsyncIterator, context: grpc.aio.ServicerContext
                         ) -> AsyncIterator:
            async for item in behavior(checked(requests, context), context):
                yield item
        return stream

    async def unary(requests: AsyncIterator, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(checked(requests, context), context)
    return unary


def guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same method with a deserializer that never raises."""
    if handler.request_deserializer is None:
        return handler
    kwargs = {"request_deserializer": _safe_deserializer(handler.request_deserializer),
              "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream_request(handler.stream_stream, True), **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_stream_request(handler.stream_unary, False), **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_unary_request(handler.unary_stream, True), **kwargs)
    return grpc.unary_unary_rpc_method_handler(
        _wrap_unary_request(handler.unary_unary, False), **kwargs)


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Put it last among the interceptors so every other one sees the guarded method."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        return handler if handler is None else guard(handler)
