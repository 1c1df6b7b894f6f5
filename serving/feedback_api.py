"""The Feedback service's two wire faces: the gRPC servicer and the HTTP routes.

Both only translate: wire -> ``rlhf.v1.Comparison`` (``Submit``, ``POST
/v1/feedback/comparisons``) or ``rlhf.v1.Demonstration`` (``SubmitDemonstration``, ``POST
/v1/feedback/demonstrations``) + the caller's ``Claim`` -> ``FeedbackService`` ->
``SubmitResponse`` or a status code. The HTTP body is the record in protobuf's canonical
JSON mapping (parsed with ``json_format``), so there is one schema. The gate (may this
caller call at all) is the surrounding server's: the gRPC interceptor, the HTTP app's
guard on ``/v1``; which labeler the caller proves is
``Credentials.claim`` (serving.auth), from the same ``authorization`` and
``x-rlhf-labeler`` on both wires. The offending field of an INVALID_ARGUMENT travels as
the gRPC trailing metadata ``rlhf-field`` and as the HTTP error's ``param``.
"""

from __future__ import annotations

import json

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from google.protobuf import json_format

from rlhf.v1 import feedback_pb2, feedback_pb2_grpc
from serving.auth import LABELER_HEADER, Credentials
from serving.feedback import FeedbackService, SubmitResult
from serving.grpc_server import STATUS as GRPC_STATUS
from serving.grpc_server import _metadata
from serving.http_api import STATUS as HTTP_STATUS
from serving.http_api import APIError
from serving.service import Code, ServiceError

ROUTE = "/v1/feedback/comparisons"
DEMONSTRATIONS_ROUTE = "/v1/feedback/demonstrations"
FIELD_METADATA = "rlhf-field"


def to_response(result: SubmitResult) -> feedback_pb2.SubmitResponse:
    return feedback_pb2.SubmitResponse(id=result.id, duplicate=result.duplicate,
                                       stream_entry_id=result.stream_entry_id)


def forwarded_labeler(context: grpc.aio.ServicerContext) -> str | None:
    """``x-rlhf-labeler`` (ASCII) or ``x-rlhf-labeler-bin`` (UTF-8: any name; gRPC text
    metadata is ASCII only)."""
    for k, v in context.invocation_metadata() or ():
        if k == LABELER_HEADER + "-bin" and isinstance(v, bytes):
            try:
                return v.decode("utf-8")
            except UnicodeDecodeError:
                raise ServiceError(Code.INVALID_ARGUMENT, f"{LABELER_HEADER}-bin is not "
                                   "UTF-8", field="labeler_id") from None
    return _metadata(context, LABELER_HEADER)


def header_text(value: str | None) -> str | None:
    """An HTTP header as the UTF-8 its bytes are (Starlette decodes them as latin-1)."""
    if value is None:
        return None
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


class FeedbackServicer(feedback_pb2_grpc.FeedbackServicer):
    def __init__(self, feedback: FeedbackService, credentials: Credentials) -> None:
        self.feedback, self.credentials = feedback, credentials

    async def Submit(self, request: feedback_pb2.SubmitRequest,
                     context: grpc.aio.ServicerContext) -> feedback_pb2.SubmitResponse:
        return await self._call(self.feedback.submit, request.comparison, context)

    async def SubmitDemonstration(self, request: feedback_pb2.SubmitDemonstrationRequest,
                                  context: grpc.aio.ServicerContext
                                  ) -> feedback_pb2.SubmitResponse:
        return await self._call(self.feedback.submit_demonstration, request.demonstration,
                                context)

    async def _call(self, submit, record, context: grpc.aio.ServicerContext
                    ) -> feedback_pb2.SubmitResponse:
        try:
            claim = self.credentials.claim(_metadata(context, "authorization"),
                                           forwarded_labeler(context))
            result = await submit(record, claim)
        except ServiceError as exc:
            trailing = ((FIELD_METADATA, exc.field),) if exc.field else ()
            await context.abort(GRPC_STATUS[exc.code], exc.message, trailing_metadata=trailing)
        return to_response(result)


def parse_comparison(body: bytes) -> feedback_pb2.Comparison:
    """The JSON body as a Comparison; APIError 400 saying what is wrong with it."""
    return parse_record(body, feedback_pb2.Comparison)


def parse_record(body: bytes, record_type):
    """The JSON body as a ``record_type`` message; APIError 400 saying what is wrong."""
    name = record_type.DESCRIPTOR.full_name
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") \
            from None
    except RecursionError:
        raise APIError(400, "request body is not valid JSON: nested too deeply",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object: an {name}",
                       code="invalid_json")
    try:
        return json_format.ParseDict(data, record_type())
    except (json_format.ParseError, RecursionError) as exc:
        raise APIError(400, f"request body is not a valid {name}: {exc}",
                       code="invalid_argument") from None


def to_api_error(exc: ServiceError) -> APIError:
    return APIError(HTTP_STATUS[exc.code], exc.message, exc.field, exc.code.value)


def feedback_router(feedback: FeedbackService, credentials: Credentials) -> APIRouter:
    """``POST /v1/feedback/comparisons`` and ``POST /v1/feedback/demonstrations``: 200 with a
    SubmitResponse; 400, 401, 403 or 503."""
    router = APIRouter()

    @router.post(ROUTE)
    async def submit_comparison(request: Request) -> JSONResponse:
        return await http_submit(request, feedback.submit, feedback_pb2.Comparison)

    @router.post(DEMONSTRATIONS_ROUTE)
    async def submit_demonstration(request: Request) -> JSONResponse:
        return await http_submit(request, feedback.submit_demonstration,
                                 feedback_pb2.Demonstration)

    async def http_submit(request: Request, submit, record_type) -> JSONResponse:
        try:
            claim = credentials.claim(request.headers.get("authorization"),
                                      header_text(request.headers.get(LABELER_HEADER)))
            result = await submit(parse_record(await request.body(), record_type), claim)
        except APIError as exc:
            return exc.response()
        except ServiceError as exc:
            headers = ({"Retry-After": "1"} if exc.code is Code.UNAVAILABLE else
                       {"WWW-Authenticate": "Bearer"} if exc.code is Code.UNAUTHENTICATED
                       else None)
            return to_api_error(exc).response(headers)
        body = json_format.MessageToDict(to_response(result), preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
        return JSONResponse(body)

    return router
