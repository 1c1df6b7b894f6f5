"""The learner admin API's error contract: one body (``{"detail": "..."}``), the handlers
that give every failure a documented code (validation 400 instead of FastAPI's 422, Redis
down 503 instead of a 500, 405 with an ``Allow`` naming every method of the path), and the
OpenAPI document listing exactly those codes, served behind the admin token."""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    detail: str


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


NOT_FOUND = {404: _error("no such iteration or adapter version")}
CONFLICT = {409: _error("an iteration is already running, or the version failed "
                        "verification")}


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request"


def _openapi(app: FastAPI, token: bool) -> dict[str, Any]:
    """FastAPI's document with the codes the app really answers: its 422 is our 400,
    every route may answer 503 (Redis down) and, with a token, 401."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in doc["paths"].values():
            for op in path.values():
                codes = op["responses"]
                if codes.pop("422", None) is not None:
                    codes["400"] = _ref("a query or path value is invalid")
                codes["503"] = _ref("Redis is unreachable")
                if token:
                    codes["401"] = _ref("missing or wrong bearer token")
                    op["security"] = [{"bearer": []}]
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        schemas["ErrorBody"] = ErrorBody.model_json_schema()
        if token:
            doc["components"]["securitySchemes"] = {"bearer": {"type": "http",
                                                               "scheme": "bearer"}}
        app.openapi_schema = doc
    return app.openapi_schema


def _methods(app: FastAPI, scope: dict[str, Any]) -> set[str]:
    """The methods the routes of this request's path accept."""
    found: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            found |= set(getattr(route, "methods", None) or ())
    return found


def _ref(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ErrorBody"}}}}


def install_errors_and_openapi(app: FastAPI, token: bool) -> None:
    """The handlers above and ``GET /openapi.json`` (behind the app's auth dependency)."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_detail(exc)}, 400)

    @app.exception_handler(redis.RedisError)
    async def _redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("admin API: Redis failed (%s: %s)", type(exc).__name__, exc)
        return JSONResponse({"detail": f"Redis is unreachable: {exc}"}, 503)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Allow: every method of this path, not the first route's
            headers["Allow"] = ", ".join(sorted(_methods(app, request.scope)))
        return JSONResponse({"detail": str(exc.detail)}, exc.status_code, headers=headers)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi() -> JSONResponse:
        return JSONResponse(_openapi(app, token))
