"""The public event contract v1 (see docs/contract.md): what the rest of StorePulse imports.

The models and their rules live in `ingest.contract_models`; `parse_event` tries the fast path
(`ingest.fast_contract`, a mirror of the models for plainly valid payloads) and falls back to
the models, which word every error as ``field: reason``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ingest.contract_models import (
    EARLIEST_YEAR,
    EVENT_TYPES,
    MAX_FUTURE,
    STEPS,
    Amount,
    ConsultationStepEvent,
    ContractError,
    Customer,
    Event,
    EventList,
    FootfallEvent,
    Id,
    PromptAnswerEvent,
    Qty,
    ReceiptDiscount,
    ReceiptEvent,
    ReceiptLine,
    ReceiptSource,
    ShortText,
    SourceText,
    StockEvent,
    StockLot,
    Tender,
    parse_with_models,
)
from ingest.fast_contract import parse_fast

__all__ = [
    "EARLIEST_YEAR",
    "EVENT_TYPES",
    "MAX_FUTURE",
    "STEPS",
    "Amount",
    "ConsultationStepEvent",
    "ContractError",
    "Customer",
    "Event",
    "EventList",
    "FootfallEvent",
    "Id",
    "PromptAnswerEvent",
    "Qty",
    "ReceiptDiscount",
    "ReceiptEvent",
    "ReceiptLine",
    "ReceiptSource",
    "ShortText",
    "SourceText",
    "StockEvent",
    "StockLot",
    "Tender",
    "parse_event",
    "parse_with_models",
]


def parse_event(payload: Any, *, now: datetime | None = None, prices_include_tax: bool | None = None) -> Event:
    """Validate one decoded JSON value against the contract or raise ContractError.

    ``prices_include_tax`` is the chain's default for receipts that do not say (None: Settings).
    Plainly valid payloads are accepted by a hand-written mirror of the models (`ingest.fast_contract`);
    anything else, every error included, goes through the models, which word the error.
    """
    event = parse_fast(payload, now=now, prices_include_tax=prices_include_tax)
    if event is not None:
        return event
    return parse_with_models(payload, now=now, prices_include_tax=prices_include_tax)
