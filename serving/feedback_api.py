"""The Feedback service's two wire faces: the gRPC servicer and the HTTP route.

Both only translate: wire -> ``rlhf.v1.Comparison`` -> ``FeedbackService.submit`` ->
``SubmitResponse`` or a status code. The HTTP body is the Comparison in protobuf's canonical
JSON mapping (parsed with ``json_format``), so there is one schema. Bearer auth comes from
the surrounding server: the gRPC interceptor, and the HTTP app's guard on ``/v1``.
"""

from __future__ import annotations

import json

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from google.protobuf import json_format

from rlhf.v1 import feedback_pb2, feedback_pb2_grpc
from serving.feedback import FeedbackService, InvalidComparison, SubmitResult
from serving.grpc_server import STATUS as GRPC_STATUS
from serving.http_api import STATUS as HTTP_STATUS
from serving.http_api import APIError
from serving.service import Code, ServiceError

ROUTE = "/v1/feedback/comparisons"


def to_response(result: SubmitResult) -> feedback_pb2.SubmitResponse:
    return feedback_pb2.SubmitResponse(id=result.id, duplicate=result.duplicate,
                                       stream_entry_id=result.stream_entry_id)


class FeedbackServicer(feedback_pb2_grpc.FeedbackServicer):
    def __init__(self, feedback: FeedbackService) -> None:
        self.feedback = feedback

    async def Submit(self, request: feedback_pb2.SubmitRequest,
                     context: grpc.aio.ServicerContext) -> feedback_pb2.SubmitResponse:
        try:
            result = await self.feedback.submit(request.comparison)
        except ServiceError as exc:
            await context.abort(GRPC_STATUS[exc.code], exc.message)
        return to_response(result)


def parse_comparison(body: bytes) -> feedback_pb2.Comparison:
    """The JSON body as a Comparison; APIError 400 saying what is wrong with it."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") \
            from None
    except RecursionError:
        raise APIError(400, "request body is not valid JSON: nested too deeply",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object: an rlhf.v1.Comparison",
                       code="invalid_json")
    try:
        return json_format.ParseDict(data, feedback_pb2.Comparison())
    except json_format.ParseError as exc:
        raise APIError(400, f"request body is not a valid rlhf.v1.Comparison: {exc}",
                       code="invalid_argument") from None


def to_api_error(exc: ServiceError) -> APIError:
    param = exc.field if isinstance(exc, InvalidComparison) else None
    return APIError(HTTP_STATUS[exc.code], exc.message, param, exc.code.value)


def feedback_router(feedback: FeedbackService) -> APIRouter:
    """``POST /v1/feedback/comparisons``: 200 with a SubmitResponse, 400 or 503 otherwise."""
    router = APIRouter()

    @router.post(ROUTE)
    async def submit_comparison(request: Request) -> JSONResponse:
        try:
            result = await feedback.submit(parse_comparison(await request.body()))
        except APIError as exc:
            return exc.response()
        except ServiceError as exc:
            retry = {"Retry-After": "1"} if exc.code is Code.UNAVAILABLE else None
            return to_api_error(exc).response(retry)
        body = json_format.MessageToDict(to_response(result), preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
        return JSONResponse(body)

    return router
