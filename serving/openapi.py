"""The serving HTTP app's OpenAPI document, made true to what the routes really do.

FastAPI's generated document promises 422 for validation errors (the API answers 400 in
the OpenAI error shape), leaves out 401/404/413/429/503, and knows no body for the
feedback route (it parses protobuf's JSON mapping itself). ``install`` post-processes the
generated document once: the real status codes with the error schema, the limits this
process enforces (from its ServingConfig), and the Comparison body schema derived from the
protobuf descriptor, so generated clients and fuzzers see the contract that is enforced.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from rlhf import contract
from serving.config import ServingConfig
from serving.service import MAX_TEMPERATURE, MAX_TOP_K, MIN_TEMPERATURE, ROLES

ERROR = {"$ref": "#/components/schemas/Error"}
ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]},
                       "code": {"type": ["string", "null"]}}}},
}
WHY = {400: "invalid request: the message names the field and what to fix",
       401: "missing or wrong bearer token (when the server has one)",
       403: "the credential may not submit rankings as this labeler (the shared token "
       "never may; a labeler token only as its own labeler)",
       404: "unknown model or adapter version",
       409: "a ranking for a queued task (task_id) that is unknown, already ranked by this "
       "labeler, or whose expired lease went to other labelers (also 403 when the task is "
       "not leased to the labeler)",
       413: "request body larger than 1 MiB",
       429: "server busy: too many requests waiting; retry with backoff",
       500: "server error (logged)", 503: "the model is loading, the server is shutting "
       "down, or the feedback store is unreachable", 504: "the request's deadline passed"}
ERRORS_BY_PATH = {
    "/v1/chat/completions": (400, 401, 404, 413, 429, 500, 503, 504),
    "/v1/models": (401, 500, 503),
    "/v1/feedback/comparisons": (400, 401, 403, 409, 413, 500, 503),
    "/v1/feedback/demonstrations": (400, 401, 403, 413, 500, 503),
    "/healthz": (500,),
    "/metrics": (500,),
}
_TEXT = {"type": "string", "pattern": r"\S"}  # not empty, not only whitespace
_INT64 = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": r"^-?[0-9]{1,19}$"}]}
_UINT64 = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 2**64 - 1},
                     {"type": "string", "pattern": r"^[0-9]{1,20}$"}]}
_SCALARS = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
    FieldDescriptor.TYPE_INT64: _INT64, FieldDescriptor.TYPE_SINT64: _INT64,
    FieldDescriptor.TYPE_UINT64: _UINT64,
}


def proto_schema(descriptor: Descriptor, components: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema of a message in protobuf's JSON mapping (proto field names; every field
    optional, as in proto3), nested messages added to ``components``; returns a $ref."""
    name = descriptor.full_name
    ref = {"$ref": f"#/components/schemas/{name}"}
    if name in components:
        return ref
    if name == "google.protobuf.Timestamp":
        components[name] = {"type": "string", "format": "date-time"}
        return ref
    components[name] = {}  # placeholder: recursive messages end here
    props = {}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            schema = proto_schema(field.message_type, components)
        elif field.type == FieldDescriptor.TYPE_ENUM:
            schema = {"type": "string", "enum": [v.name for v in field.enum_type.values]}
        else:
            schema = dict(_SCALARS.get(field.type, {}))
        props[field.name] = {"type": "array", "items": schema} if field.is_repeated else schema
    components[name] = {"type": "object", "properties": props, "additionalProperties": False}
    return ref


def _chat_request(config: ServingConfig) -> dict[str, Any]:
    tokens = {"type": "integer", "minimum": 1, "maximum": config.max_new_tokens}
    part = {"type": "object", "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": _TEXT}}
    message = {"type": "object", "required": ["role", "content"],
               "properties": {"role": {"enum": [*ROLES, "developer"]},
                              "content": {"anyOf": [_TEXT, {"type": "array", "items": part,
                                                             "minItems": 1}]}}}
    stop = {"type": "string", "minLength": 1}
    optional = {
        "model": {"type": "string", "description": "the base model's name, 'base' or "
                  "a loaded adapter version (GET /v1/models)"},
        "n": {"type": "integer", "minimum": 1, "maximum": config.max_n},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object",
                           "properties": {"include_usage": {"type": ["boolean", "null"]}}},
        "max_tokens": tokens, "max_completion_tokens": tokens,
        "min_tokens": {"type": "integer", "minimum": 0, "maximum": config.max_new_tokens},
        "temperature": {"anyOf": [{"const": 0}, {"type": "number", "minimum": MIN_TEMPERATURE,
                                                 "maximum": MAX_TEMPERATURE}],
                        "description": "0 = greedy"},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": 0, "maximum": MAX_TOP_K,
                  "description": "0 = no limit"},
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**64 - 1},
        "stop": {"anyOf": [stop, {"type": "array", "items": stop,
                                  "maxItems": config.max_stop_sequences}]},
        "adapter_version": {"type": "string", "description": "pin a loaded version; empty "
                            "= the current one",
                            "pattern": r"^([A-Za-z0-9][A-Za-z0-9._-]{0,63})?$"},
    }
    return {
        "type": "object", "required": ["messages"],
        "description": "OpenAI chat completion request. Besides the limits below, the "
                       "prompt must fit the model's context window (GET /v1/models, "
                       "gRPC GetInfo) and min_tokens must not exceed max_tokens.",
        "properties": {"messages": {"type": "array", "items": message, "minItems": 1},
                       **{k: {"anyOf": [v, {"type": "null"}]} for k, v in optional.items()}},
    }


_COMPLETION = {
    "type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "chat.completion"},
        "created": {"type": "integer"}, "model": {"type": "string"},
        "system_fingerprint": {"type": "string"}, "adapter_version": {"type": "string"},
        "choices": {"type": "array", "items": {
            "type": "object", "required": ["index", "message", "finish_reason"],
            "properties": {"index": {"type": "integer"},
                           "message": {"type": "object", "properties": {
                               "role": {"const": "assistant"}, "content": {"type": "string"}}},
                           "finish_reason": {"enum": ["stop", "length", None]}}}},
        "usage": {"type": "object", "properties": {
            "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
            "total_tokens": {"type": "integer"}}},
    },
}
_EVENT = {"type": "object", "required": ["data"],  # one server-sent event
          "properties": {"data": {"type": "string", "description": "a chat.completion.chunk "
                                  "or an error object as JSON; the last one is [DONE]"},
                         "event": {"type": "string"}}}
_MODELS = {"type": "object", "required": ["object", "data"], "properties": {
    "object": {"const": "list"},
    "data": {"type": "array", "items": {"type": "object", "required": ["id", "object"],
                                        "properties": {"id": {"type": "string"},
                                                       "object": {"const": "model"}}}}}}
_HEALTH = {"type": "object", "required": ["status"],
           "properties": {"status": {"enum": ["ok", "loading", "draining"]}}}


def _comparison_rules(components: dict[str, Any]) -> None:
    """The per-field rules of rlhf/contract.py that JSON Schema can say (the rest, such as
    ranks within 1..K and positions a permutation, are in proto/rlhf/v1/feedback.proto)."""
    record = components["rlhf.v1.Comparison"]
    record["required"] = ["id", "labeler_id", "messages", "candidates"]
    props = record["properties"]
    props["id"] = {"type": "string", "pattern": f"^{contract.ID_RE.pattern}$"}
    props["labeler_id"] = _TEXT
    props["messages"].update(minItems=1)
    props["candidates"].update(minItems=2, maxItems=9)
    chat = components["rlhf.v1.ChatMessage"]
    chat["required"] = ["role", "content"]
    chat["properties"].update(role={"enum": list(ROLES)}, content=_TEXT)
    candidate = components["rlhf.v1.Candidate"]
    candidate["required"] = ["text", "rank"]
    candidate["properties"].update(text=_TEXT, rank={"type": "integer", "minimum": 1,
                                                     "maximum": 9})


def _demonstration_rules(components: dict[str, Any]) -> None:
    """The same for a Demonstration (ending on a user turn is in the proto only)."""
    record = components["rlhf.v1.Demonstration"]
    record["required"] = ["id", "messages", "answer", "source"]
    props = record["properties"]
    props["id"] = {"type": "string", "pattern": f"^{contract.ID_RE.pattern}$"}
    props["labeler_id"], props["answer"] = _TEXT, _TEXT
    props["messages"].update(minItems=1)


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _document(app: FastAPI, config: ServingConfig) -> dict[str, Any]:
    from rlhf.v1 import feedback_pb2

    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    components["Error"] = ERROR_SCHEMA
    components["ChatRequest"] = _chat_request(config)
    for path, operations in doc.get("paths", {}).items():
        for op in operations.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            for status in ERRORS_BY_PATH.get(path, (500,)):
                responses[str(status)] = _json(ERROR, WHY[status])
    paths = doc["paths"]
    chat = paths["/v1/chat/completions"]["post"]["responses"]
    chat["200"] = {"description": "the completion (JSON), or with stream=true the chunks "
                   "as server-sent events",
                   "content": {"application/json": {"schema": _COMPLETION},
                               "text/event-stream": {"itemSchema": _EVENT}}}
    paths["/v1/models"]["get"]["responses"]["200"] = _json(_MODELS, "the served models")
    health = paths["/healthz"]["get"]["responses"]
    health["200"] = _json(_HEALTH, "ready")
    health["503"] = _json(_HEALTH, "loading or draining")
    paths["/metrics"]["get"]["responses"]["200"] = {
        "description": "Prometheus text format",
        "content": {"text/plain": {"schema": {"type": "string"}}}}
    for path, record, rules in (
            ("/v1/feedback/comparisons", feedback_pb2.Comparison, _comparison_rules),
            ("/v1/feedback/demonstrations", feedback_pb2.Demonstration, _demonstration_rules)):
        feedback = paths.get(path, {}).get("post")
        if feedback is None:
            continue
        body = proto_schema(record.DESCRIPTOR, components)
        rules(components)
        feedback["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": body}}, "description": f"an {record.DESCRIPTOR.full_name} in protobuf's "
            "JSON mapping (proto/rlhf/v1/feedback.proto says what a valid record is)"}
        feedback["responses"]["200"] = _json(
            proto_schema(feedback_pb2.SubmitResponse.DESCRIPTOR, components), "stored")
    return doc


def install(app: FastAPI, config: ServingConfig) -> None:
    """Serve the corrected document at /openapi.json (built once, on first request, so
    routers included after ``create_app`` are in it)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document(app, config)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
