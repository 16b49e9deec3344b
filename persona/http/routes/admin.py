"""The operator's routes: ``GET /healthz`` (no authentication), ``GET /metrics`` (Prometheus text)
and ``GET /openapi.json`` (the app's schema, behind authentication like every route but /healthz)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from ..auth import Caller
from ..state import ServerState, server_state

router = APIRouter()
State = Annotated[ServerState, Depends(server_state)]


@router.get("/healthz")
async def healthz(state: State):
    return {"status": "ok", "base": state.engine.base_name}


@router.get("/metrics")
async def metrics(state: State, _scope: Caller):
    text, content_type = state.metrics.exposition()
    return PlainTextResponse(text, media_type=content_type)


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request, _scope: Caller):
    return JSONResponse(request.app.openapi())
