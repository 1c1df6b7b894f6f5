"""The one place the UI talks to serving: Policy.Generate/GetInfo and Feedback.Submit /
SubmitDemonstration.

Rankings carry the logged-in labeler in the ``x-rlhf-labeler`` metadata; serving believes
it only from its UI service token (serving's ``--ui-token``, given to the UI as its
``--auth-token``), so one person cannot submit as another.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc

from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import feedback_pb2_grpc as fbg
from rlhf.v1 import policy_pb2 as pb
from rlhf.v1 import policy_pb2_grpc as pbg

log = logging.getLogger(__name__)
LABELER_METADATA = "x-rlhf-labeler"  # serving.auth.LABELER_HEADER (ui imports only rlhf.v1)

# Codes after which the same record may be sent again: nothing was stored, or we cannot
# know (a deadline); the id makes a second store impossible either way.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED}


class ServingError(Exception):
    """A failed call, with a message meant for the labeler."""

    def __init__(self, message: str, code: grpc.StatusCode | None, retryable: bool) -> None:
        super().__init__(message)
        self.code, self.retryable = code, retryable


@dataclass(frozen=True)
class Delta:
    """Text added to one alternative; ``done`` on its last chunk."""

    index: int
    text: str
    done: bool
    adapter_version: str
    seed: int


def user_message(exc: grpc.RpcError, action: str) -> ServingError:
    """Map a gRPC status to a plain sentence (``action``: 'generate' or 'submit')."""
    code, details = exc.code(), exc.details() or ""
    stored = action == "submit"
    if code == grpc.StatusCode.UNAVAILABLE:
        text = ("Serving (or its Redis) is down: the ranking was NOT stored. It is kept; "
                "press Retry." if stored else "Serving is down or still loading; try again.")
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        text = ("Serving did not answer in time; the ranking is kept, press Retry."
                if stored else "Serving did not answer in time; try again.")
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        text = "The UI's token for serving is wrong or missing (ask an operator)."
    elif code == grpc.StatusCode.PERMISSION_DENIED and details.startswith("task_id"):
        text = f"Serving refused this ranking of the task: {details}"
    elif code == grpc.StatusCode.PERMISSION_DENIED:
        text = (f"Serving would not store this ranking under your name: {details} (ask an "
                "operator: the UI needs serving's --ui-token as its token)")
    elif code == grpc.StatusCode.FAILED_PRECONDITION:
        text = f"Serving refused this ranking of the task: {details}"
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        text = "Serving is busy; try again in a moment."
    elif code == grpc.StatusCode.INVALID_ARGUMENT:
        text = f"Serving refused the {'ranking' if stored else 'request'}: {details}"
    elif code == grpc.StatusCode.UNIMPLEMENTED and stored:
        text = "Serving runs without feedback storage (no --redis-url); nothing was stored."
    else:
        text = f"Serving failed ({code.name}): {details}"
    retryable = stored and code in RETRYABLE
    return ServingError(text, code, retryable)


def labeler_metadata(labeler: str) -> list[tuple[str, str | bytes]]:
    """gRPC text metadata is printable ASCII; any other name goes as UTF-8 in ``-bin``."""
    if not labeler:
        return []
    if labeler.isascii() and labeler.isprintable():
        return [(LABELER_METADATA, labeler)]
    return [(LABELER_METADATA + "-bin", labeler.encode("utf-8"))]


class ServingClient:
    """Synchronous gRPC client of `rlhf serve` (Gradio runs handlers in worker threads)."""

    def __init__(self, target: str, auth_token: str = "", timeout_s: float = 120.0) -> None:
        self._channel = grpc.insecure_channel(target)
        self._policy = pbg.PolicyStub(self._channel)
        self._feedback = fbg.FeedbackStub(self._channel)
        self._metadata = [("authorization", f"Bearer {auth_token}")] if auth_token else []
        self._timeout = timeout_s

    def close(self) -> None:
        self._channel.close()

    def info(self) -> pb.ServerInfo:
        try:
            return self._policy.GetInfo(pb.GetInfoRequest(), timeout=min(self._timeout, 10.0),
                                        metadata=self._metadata)
        except grpc.RpcError as exc:
            raise user_message(exc, "info") from None

    def generate(self, messages: Sequence[dict[str, str]], n: int,
                 sampling: pb.SamplingParams, request_id: str) -> Iterator[Delta]:
        """Stream the ``n`` alternatives of one turn, interleaved, as per-index deltas."""
        request = pb.GenerateRequest(
            request_id=request_id, n=n, sampling=sampling,
            messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages])
        stream = self._policy.Generate(request, timeout=self._timeout, metadata=self._metadata)
        try:
            for chunk in stream:
                yield Delta(index=chunk.index, text=chunk.text,
                            done=chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED,
                            adapter_version=chunk.adapter_version, seed=chunk.seed)
        except grpc.RpcError as exc:
            raise user_message(exc, "generate") from None
        finally:
            stream.cancel()

    def submit(self, record: fb.Comparison) -> fb.SubmitResponse:
        """Store one ranking as its labeler (the logged-in person the handlers put in
        ``record.labeler_id``); OK only after Redis accepted it (idempotent by record.id)."""
        who = record.labeler_id
        metadata = [*self._metadata, *labeler_metadata(who)]
        try:
            return self._feedback.Submit(fb.SubmitRequest(comparison=record),
                                         timeout=min(self._timeout, 30.0), metadata=metadata)
        except grpc.RpcError as exc:
            log.warning("submit of %s failed: %s", record.id, exc.code())
            raise user_message(exc, "submit") from None

    def submit_demonstration(self, record: fb.Demonstration) -> fb.SubmitResponse:
        """Store one demonstration as its labeler, like ``submit`` (idempotent by id)."""
        metadata = [*self._metadata, *labeler_metadata(record.labeler_id)]
        try:
            return self._feedback.SubmitDemonstration(
                fb.SubmitDemonstrationRequest(demonstration=record),
                timeout=min(self._timeout, 30.0), metadata=metadata)
        except grpc.RpcError as exc:
            log.warning("submit of demonstration %s failed: %s", record.id, exc.code())
            raise user_message(exc, "submit") from None
