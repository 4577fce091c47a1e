"""Ingest and health endpoints of the public contract."""

from __future__ import annotations

import json
import logging
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
from ingest.errors import classify
from ingest.health import schema_problem
from ingest.service import EventResult, ingest_payloads

log = logging.getLogger(__name__)

router = APIRouter()

# What a device is told to wait before sending a batch again that the database could not store.
RETRY_AFTER_S = 30


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
    try:
        results = await run_in_threadpool(
            _ingest, request.app.state.engine, batch["events"], device.store_id, device.name
        )
    except Exception as exc:
        diagnosis = classify(exc)
        if diagnosis.is_data:
            raise
        # The events are fine and the device still has them: nothing is stored or dead-lettered,
        # and the device sends the batch again (duplicates of it are recognised).
        log.error("POST /api/v1/events from %s: %d events not stored: %s", device.name, len(batch["events"]),
                  diagnosis.reason)  # fmt: skip
        raise HTTPException(
            503,
            detail=f"storage unavailable, nothing was stored; send the batch again later ({diagnosis.reason})",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from None
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
    """Liveness and readiness: the database answers, ingest can write its tables (columns, privileges)
    and, when configured, the broker accepts connections. 503 names the reason."""
    engine = request.app.state.engine
    db_ok, db_detail = database_ok(engine)
    problem = schema_problem(engine) if db_ok else None
    broker = broker_status(request.app.state.settings.mqtt_url)
    healthy = db_ok and problem is None and broker["ok"]
    body: dict[str, Any] = {
        "status": "ok" if healthy else "degraded",
        "database": {"ok": db_ok, "detail": db_detail, "dialect": engine.dialect.name},
        "ingest": {"ok": problem is None, "detail": problem or "ok"},
        "broker": broker,
    }
    if not healthy:
        reasons = [
            f"database: {db_detail}" if not db_ok else None,
            problem,
            f"broker {broker.get('address')}: {broker.get('error')}" if not broker["ok"] else None,
        ]
        body["reason"] = "; ".join(r for r in reasons if r)
    return JSONResponse(body, status_code=200 if healthy else 503)
