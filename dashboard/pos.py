"""The POS API of the contract: scan, consultation steps, prompt answers, checkout, trace.

Every route takes a device token and only works for the token's store.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime, BaseModel, Field

from dashboard.deps import Device
from dashboard.permissions import of_device
from ingest.db import session_scope
from store_rules import counter

router = APIRouter(prefix="/api/v1", tags=["pos"])

Id = Field(min_length=1, max_length=64)


class ScanIn(BaseModel):
    store_id: str = Id
    terminal_id: str = Id
    receipt_id: str = Id
    sku: str = Id
    consultation_id: str | None = Field(default=None, max_length=64)
    kind: Literal["sale", "return"] = "sale"


class StepIn(BaseModel):
    store_id: str = Id
    terminal_id: str = Id
    step: Literal["consultation", "symptoms", "recommendation", "insurance_check", "guidance"]
    status: Literal["done", "skipped"]
    staff_id: str | None = Field(default=None, max_length=64)
    skip_reason: str | None = Field(default=None, max_length=200)
    data: dict[str, Any] | None = None
    customer: dict[str, Any] | None = None
    event_id: str | None = Field(default=None, max_length=64, description="for safe retries; generated if absent")
    occurred_at: AwareDatetime | None = Field(default=None, description="defaults to the server's time")


class PromptAnswerIn(BaseModel):
    store_id: str = Id
    terminal_id: str = Id
    receipt_id: str = Id
    sku: str = Id
    prompt_id: str = Id
    answer: str = Field(min_length=1, max_length=200)
    staff_id: str | None = Field(default=None, max_length=64)
    event_id: str | None = Field(default=None, max_length=64)
    occurred_at: AwareDatetime | None = None


class CheckoutIn(BaseModel):
    store_id: str = Id
    terminal_id: str = Id
    receipt_id: str = Id
    consultation_id: str | None = Field(default=None, max_length=64)
    skus: list[str] = Field(min_length=1, max_length=1000)
    kind: Literal["sale", "return"] = Field(default="sale", description="returns need no counter flow")


def own_store(device: Device, store_id: str) -> None:
    if not of_device(device).sees_store(store_id):
        raise HTTPException(403, detail=f"store_id: this device token is for store {device.store_id!r}")


def refused(exc: counter.CounterError) -> JSONResponse:
    return JSONResponse(exc.body or {"detail": str(exc)}, status_code=exc.status)


@router.post("/pos/scan")
def pos_scan(body: ScanIn, request: Request, device: Device) -> dict[str, Any]:
    """Prompts to show, the flow status when the SKU is flow-controlled, and its active promotions."""
    own_store(device, body.store_id)
    with session_scope(request.app.state.engine) as session:
        return counter.scan(
            session=session, store_id=body.store_id, receipt_id=body.receipt_id, sku=body.sku,
            consultation_id=body.consultation_id, kind=body.kind,
            promotions_cache_s=request.app.state.settings.promotions_cache_s,
        )  # fmt: skip


@router.post("/pos/consultations/{consultation_id}/steps", status_code=201, response_model=None)
def pos_step(consultation_id: str, body: StepIn, request: Request, device: Device) -> dict[str, Any] | JSONResponse:
    """Record a step in order; 409 names the step still missing before it, 422 what the data lacks."""
    own_store(device, body.store_id)
    try:
        with session_scope(request.app.state.engine) as session:
            return counter.record_step(
                session=session, store_id=body.store_id, terminal_id=body.terminal_id,
                consultation_id=consultation_id, step=body.step, status=body.status, staff_id=body.staff_id,
                skip_reason=body.skip_reason, data=body.data, customer=body.customer, event_id=body.event_id,
                occurred_at=body.occurred_at,
            )  # fmt: skip
    except counter.CounterError as exc:
        return refused(exc)


@router.post("/pos/prompt-answers", status_code=201, response_model=None)
def pos_prompt_answer(body: PromptAnswerIn, request: Request, device: Device) -> dict[str, Any] | JSONResponse:
    """Record the answer to a scan-time prompt (a `prompt_answer` event)."""
    own_store(device, body.store_id)
    try:
        with session_scope(request.app.state.engine) as session:
            return counter.record_prompt_answer(
                session=session, store_id=body.store_id, terminal_id=body.terminal_id, receipt_id=body.receipt_id,
                sku=body.sku, prompt_id=body.prompt_id, answer=body.answer, staff_id=body.staff_id,
                event_id=body.event_id, occurred_at=body.occurred_at,
            )  # fmt: skip
    except counter.CounterError as exc:
        return refused(exc)


@router.post("/pos/checkout", response_model=None)
def pos_checkout(body: CheckoutIn, request: Request, device: Device) -> dict[str, Any] | JSONResponse:
    """200 `{"allowed": true}`, or 409 with each missing step, the SKUs that need it and a message."""
    own_store(device, body.store_id)
    if body.kind == "return":
        return {"allowed": True}
    with session_scope(request.app.state.engine) as session:
        decision = counter.checkout(
            session=session, store_id=body.store_id, consultation_id=body.consultation_id, skus=body.skus
        )
    if decision.allowed:
        return decision.as_dict()
    return JSONResponse(decision.as_dict(), status_code=409)


@router.get("/stores/{store_id}/receipts/{receipt_id}/trace")
def receipt_trace(
    store_id: str, receipt_id: str, request: Request, device: Device, terminal_id: str | None = None
) -> dict[str, Any]:
    """A sale followed back to its first contact (customer names masked, see `dashboard.permissions`).

    Receipt ids need only be unique per till: pass `terminal_id` when tills number independently.
    """
    own_store(device, store_id)
    with session_scope(request.app.state.engine) as session:
        found = counter.trace(session=session, store_id=store_id, receipt_id=receipt_id, terminal_id=terminal_id)
    if found is None:
        raise HTTPException(404, detail=f"receipt_id: no receipt {receipt_id!r} in store {store_id!r}")
    return of_device(device).trace(found, store_id)
