"""The OpenAPI description of ``POST /v1/feedback/comparisons``, made from the proto itself.

The body is ``rlhf.v1.Comparison`` in protobuf's canonical JSON mapping, so its JSON schema
is derived from the message descriptors (one schema, never hand-copied): field names in
both spellings the parser accepts (``labeler_id`` and ``labelerId``), enums by name or
number, 64-bit integers as decimal strings or numbers, timestamps as RFC 3339 strings.
The contract's formats (``rlhf.contract``) are added where JSON Schema can say them; the
rules it cannot (ranks within 1..K, known adapter versions) answer 400 with ``param``.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from rlhf import contract
from rlhf.v1 import feedback_pb2

_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
_UINT32 = {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}
_INT64 = {"oneOf": [{"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
                    {"type": "string", "pattern": r"^-?[0-9]{1,19}$"}]}
_UINT64 = {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 2**64 - 1},
                     {"type": "string", "pattern": r"^[0-9]{1,20}$"}]}
_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_INT32: _INT32, FieldDescriptor.TYPE_SINT32: _INT32,
    FieldDescriptor.TYPE_UINT32: _UINT32,
    FieldDescriptor.TYPE_INT64: _INT64, FieldDescriptor.TYPE_SINT64: _INT64,
    FieldDescriptor.TYPE_UINT64: _UINT64,
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}
# Where the contract's format fits JSON Schema (ECMA patterns: "$" is the very end).
_FORMATS: dict[tuple[str, str], dict[str, Any]] = {
    ("rlhf.v1.Comparison", "id"): {"pattern": "^[A-Za-z0-9_-]{8,64}$"},
    ("rlhf.v1.Comparison", "labeler_id"): {"maxLength": 128},
    ("rlhf.v1.Comparison", "messages"): {"minItems": 1, "maxItems": 256},
    ("rlhf.v1.Comparison", "candidates"): {"minItems": 2, "maxItems": 9},
    ("rlhf.v1.Candidate", "adapter_version"): {
        "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
    ("rlhf.v1.Candidate", "rank"): {"minimum": 1, "maximum": 9},
    ("rlhf.v1.Candidate", "position"): {"maximum": 8},
    ("rlhf.v1.Candidate", "request_id"): {"maxLength": 128},
    ("rlhf.v1.ChatMessage", "role"): {"enum": list(contract.ROLES)},
    ("rlhf.v1.ChatMessage", "content"): {"minLength": 1},
    ("rlhf.v1.Candidate", "text"): {"minLength": 1},
    ("rlhf.v1.SamplingParams", "temperature"): {"minimum": 0,
                                                 "maximum": contract.MAX_TEMPERATURE},
    ("rlhf.v1.SamplingParams", "top_p"): {"exclusiveMinimum": 0, "maximum": 1},
}


# Fields without which no record is valid (their names are the same in both spellings).
_REQUIRED = {"rlhf.v1.Comparison": ("id", "messages", "candidates"),
             "rlhf.v1.ChatMessage": ("role", "content"),
             "rlhf.v1.Candidate": ("text", "rank")}


def _field_schema(f: FieldDescriptor) -> dict[str, Any]:
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        if f.message_type.full_name == "google.protobuf.Timestamp":
            one: dict[str, Any] = {"type": "string", "format": "date-time"}
        else:
            one = message_schema(f.message_type)
    elif f.type == FieldDescriptor.TYPE_ENUM:
        values = f.enum_type.values
        one = {"oneOf": [{"type": "string", "enum": [v.name for v in values]},
                         {"type": "integer", "enum": [v.number for v in values]}]}
    else:
        one = dict(_SCALARS[f.type])
    extra = _FORMATS.get((f.containing_type.full_name, f.name), {})
    if f.is_repeated:
        items = {k: v for k, v in extra.items() if k not in ("minItems", "maxItems")}
        return {"type": "array", "items": {**one, **items},
                **{k: v for k, v in extra.items() if k in ("minItems", "maxItems")}}
    return {**one, **extra}


def message_schema(desc: Descriptor) -> dict[str, Any]:
    """The inline JSON schema of a message (these messages nest, none recurses)."""
    props: dict[str, Any] = {}
    for f in desc.fields:
        schema = _field_schema(f)
        props[f.name] = schema
        if f.json_name != f.name:
            props[f.json_name] = schema
    schema = {"type": "object", "properties": props, "additionalProperties": False,
              "description": f"{desc.full_name} in protobuf's canonical JSON mapping"}
    if desc.full_name in _REQUIRED:
        schema["required"] = list(_REQUIRED[desc.full_name])
    return schema


def submit_openapi() -> dict[str, Any]:
    """``openapi_extra`` of the route: the request body (the route reads it raw)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": message_schema(feedback_pb2.Comparison.DESCRIPTOR)}}}}


_ERROR = {"content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}}}}
SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "stored (or already stored: duplicate = true)", "content": {
        "application/json": {"schema": message_schema(feedback_pb2.SubmitResponse.DESCRIPTOR)}}},
    400: {"description": "the record breaks the contract; nothing stored; param names the "
          "field", **_ERROR},
    401: {"description": "missing or unknown credential", **_ERROR},
    403: {"description": "the credential may not submit as this labeler", **_ERROR},
    413: {"description": "body larger than the limit", **_ERROR},
    503: {"description": "Redis unreachable: NOT stored, retry with the same id", **_ERROR},
}
