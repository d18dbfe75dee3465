"""Kubernetes probes. Open (no API key) and not counted as API requests in the metrics.

- `/health/startup`: 200 once the model is loaded and warmed up (the startup probe holds the other two off
  until then, so a slow load is not mistaken for a hung process).
- `/health/live`: 200 while the process and the engine loop are alive; 503 once the engine loop died or the
  model failed to load (the kubelet restarts the container; `python -m serving` also exits by itself then).
- `/health/ready`: 200 while serving with a live engine; 503 while loading, while draining after SIGTERM, and once
  the engine died, so the Service stops sending new requests here.
"""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(prefix="/health", tags=["health"])


def _answer(ok: bool, status: str) -> JSONResponse:
    return JSONResponse({"status": status}, status_code=200 if ok else 503)


@router.get("/startup")
async def startup(request: Request) -> JSONResponse:
    state = request.app.state.server
    return _answer(state.started, "started" if state.started else state.phase.value)


@router.get("/live")
async def live(request: Request) -> JSONResponse:
    state = request.app.state.server
    if state.failed:  # the process exits too; this covers an app embedded without serving.__main__
        return _answer(False, "failed")
    if state.engine_died():
        return _answer(False, "engine loop dead")
    return _answer(True, "alive")


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    state = request.app.state.server
    ready = state.ready
    return _answer(ready, "ready" if ready else state.phase.value)
