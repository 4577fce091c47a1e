"""Ingest and health endpoints of the public contract."""

from __future__ import annotations

import json
import socket
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import Engine

from dashboard.deps import Device
from ingest.db import database_ok, session_scope
from ingest.service import EventResult, ingest_payloads

router = APIRouter()


class EventResultOut(BaseModel):
    event_id: str | None
    status: str
    error: str | None


class IngestResponse(BaseModel):
    results: list[EventResultOut]


class EventBatchIn(BaseModel):
    """A batch of contract events (see docs/contract.md); each is validated on its own."""

    events: list[dict[str, Any]]


@router.post(
    "/api/v1/events",
    response_model=IngestResponse,
    tags=["ingest"],
    openapi_extra={"requestBody": {"content": {"application/json": {"schema": EventBatchIn.model_json_schema()}}}},
)
async def post_events(request: Request, device: Device) -> dict[str, Any]:
    """Store a batch `{"events": [...]}`; answers per event accepted / duplicate / rejected."""
    body = await request.body()
    try:
        batch = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HTTPException(422, detail=f"body: not valid JSON ({exc})") from None
    if not isinstance(batch, dict) or not isinstance(batch.get("events"), list):
        raise HTTPException(422, detail='body: expected an object {"events": [...]}')
    results = await run_in_threadpool(_ingest, request.app.state.engine, batch["events"], device.store_id, device.name)
    return {"results": [r.as_dict() for r in results]}


def _ingest(engine: Engine, events: list[Any], store_id: str, device_name: str) -> list[EventResult]:
    # The transaction commits before the answer is sent: "accepted" means stored.
    with session_scope(engine) as session:
        return ingest_payloads(events, session=session, source=f"http:{device_name}", allowed_store_id=store_id)


def broker_status(mqtt_url: str | None, timeout_s: float = 1.0) -> dict[str, Any]:
    if not mqtt_url:
        return {"configured": False, "ok": True}
    parts = urlsplit(mqtt_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 1883
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return {"configured": True, "ok": True, "address": f"{host}:{port}"}
    except OSError as exc:
        return {"configured": True, "ok": False, "address": f"{host}:{port}", "error": str(exc)}


@router.get("/healthz", tags=["health"])
def healthz(request: Request) -> JSONResponse:
    """Liveness and readiness: the database answers and, when configured, the broker accepts connections."""
    db_ok, db_detail = database_ok(request.app.state.engine)
    broker = broker_status(request.app.state.settings.mqtt_url)
    healthy = db_ok and broker["ok"]
    body = {
        "status": "ok" if healthy else "degraded",
        "database": {"ok": db_ok, "detail": db_detail, "dialect": request.app.state.engine.dialect.name},
        "broker": broker,
    }
    return JSONResponse(body, status_code=200 if healthy else 503)
