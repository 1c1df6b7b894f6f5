"""OpenAI-compatible HTTP face (placeholder until implemented)."""

from __future__ import annotations

from fastapi import FastAPI

from serving.service import PolicyService


def create_app(service: PolicyService) -> FastAPI:
    app = FastAPI()
    return app
