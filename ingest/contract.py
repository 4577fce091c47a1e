"""The public event contract v1 (see docs/contract.md): one pydantic model per event type.

Errors are reported as ``field: reason`` so a till developer can fix the payload without
reading our code.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

STEPS: tuple[str, ...] = ("consultation", "symptoms", "recommendation", "insurance_check", "guidance")
EVENT_TYPES: tuple[str, ...] = ("receipt", "consultation_step", "prompt_answer", "footfall", "stock")
MAX_FUTURE = timedelta(minutes=10)
# Also keeps UTC conversion clear of datetime.min (year 1 with a positive offset overflows).
EARLIEST_YEAR = 2000


def _decimal(value: Any, places: int, what: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        raise ValueError(f"{what} must be a decimal string or a number")
    try:
        number = Decimal(str(value).strip()) if isinstance(value, str | float) else Decimal(value)
    except InvalidOperation:
        raise ValueError(f"{what} {value!r} is not a decimal number") from None
    if not number.is_finite():
        raise ValueError(f"{what} must be finite")
    exponent = number.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -places:
        raise ValueError(f"{what} {value!r} has more than {places} decimals")
    if abs(number) >= Decimal(10) ** 11:
        raise ValueError(f"{what} {value!r} is out of range")
    return number


Amount = Annotated[Decimal, BeforeValidator(lambda v: _decimal(v, 2, "amount"))]
Qty = Annotated[Decimal, BeforeValidator(lambda v: _decimal(v, 3, "quantity"))]
# NUL cannot be stored in PostgreSQL text; refusing it here names the field instead of failing the row.
Id = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64, pattern=r"^[^\x00]*$")]
ShortText = Annotated[str, StringConstraints(max_length=200, pattern=r"^[^\x00]*$")]


def _parse_event_time(value: Any, info: ValidationInfo) -> datetime:
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ValueError(f"{value!r} is not an RFC 3339 timestamp") from None
    elif isinstance(value, datetime):
        parsed = value
    else:
        raise ValueError("must be an RFC 3339 timestamp string")
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ValueError(f"{value!r} has no UTC offset; naive timestamps are rejected")
    if parsed.year < EARLIEST_YEAR:
        raise ValueError(f"{value!r} is before {EARLIEST_YEAR}; a till clock is wrong")
    now = (info.context or {}).get("now") or datetime.now(UTC)
    if parsed - now > MAX_FUTURE:
        raise ValueError(f"{value!r} is more than 10 minutes in the future")
    return parsed


def _invalid_text_at(value: Any, path: str) -> str | None:
    """Path of the first string that cannot be stored as UTF-8 text (NUL, unpaired surrogate)."""
    if isinstance(value, str):
        if "\x00" in value:
            return path
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _invalid_text_at(key, path) or _invalid_text_at(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _invalid_text_at(item, f"{path}[{index}]")
            if found:
                return found
    return None


class _Event(BaseModel):
    # Unknown fields are kept (they stay in the raw payload) and are not an error.
    model_config = ConfigDict(extra="allow", frozen=False)

    event_id: Id
    store_id: Id
    occurred_at: datetime

    _check_time = field_validator("occurred_at", mode="before")(_parse_event_time)

    @model_validator(mode="after")
    def _storable_free_text(self) -> _Event:
        # Typed fields are checked by their types; free-form parts (unknown fields, step data)
        # are checked here so every backend refuses the same payloads.
        free_form = {**(self.model_extra or {}), "data": getattr(self, "data", None)}
        bad = _invalid_text_at(free_form, "")
        if bad:
            raise ValueError(f"{bad}: text with a NUL character or an unpaired surrogate cannot be stored")
        return self


class ReceiptLine(BaseModel):
    model_config = ConfigDict(extra="allow")
    line_no: int = Field(ge=1, le=100_000)
    sku: Id
    qty: Qty
    unit_price: Amount
    amount: Amount
    promotion_id: Id | None = None


class ReceiptEvent(_Event):
    type: Literal["receipt"]
    terminal_id: Id
    receipt_id: Id
    kind: Literal["sale", "return"]
    staff_id: Id | None = None
    member_id: Id | None = None
    consultation_id: Id | None = None
    lines: list[ReceiptLine] = Field(min_length=1, max_length=1000)
    total: Amount

    @model_validator(mode="after")
    def _consistent(self) -> ReceiptEvent:
        seen: set[int] = set()
        for index, line in enumerate(self.lines):
            if line.line_no in seen:
                raise ValueError(f"lines[{index}].line_no: duplicate line number {line.line_no}")
            seen.add(line.line_no)
            if self.kind == "return" and (line.qty >= 0 or line.amount > 0):
                raise ValueError(f"lines[{index}]: return lines need a negative qty and amount")
        line_sum = sum((line.amount for line in self.lines), Decimal(0))
        if line_sum != self.total:
            raise ValueError(f"total: {self.total} is not the sum of line amounts ({line_sum})")
        return self


class Customer(BaseModel):
    model_config = ConfigDict(extra="allow")
    member_id: Id | None = None
    name: Annotated[str, StringConstraints(max_length=100)] | None = None


class ConsultationStepEvent(_Event):
    type: Literal["consultation_step"]
    terminal_id: Id
    consultation_id: Id
    staff_id: Id | None = None
    customer: Customer | None = None
    step: Literal["consultation", "symptoms", "recommendation", "insurance_check", "guidance"]
    status: Literal["done", "skipped"]
    skip_reason: ShortText | None = None
    data: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _step_rules(self) -> ConsultationStepEvent:
        if self.status == "skipped" and not (self.skip_reason and self.skip_reason.strip()):
            raise ValueError("skip_reason: a skipped step needs a reason")
        data = self.data or {}
        if self.status == "done" and self.step == "insurance_check" and data.get("result") not in ("pass", "fail"):
            raise ValueError("data.result: insurance_check needs 'pass' or 'fail'")
        if "keywords" in data and not (
            isinstance(data["keywords"], list) and all(isinstance(k, str) for k in data["keywords"])
        ):
            raise ValueError("data.keywords: must be a list of strings")
        if "skus" in data and not (isinstance(data["skus"], list) and all(isinstance(k, str) for k in data["skus"])):
            raise ValueError("data.skus: must be a list of SKU strings")
        return self


class PromptAnswerEvent(_Event):
    type: Literal["prompt_answer"]
    terminal_id: Id
    receipt_id: Id
    sku: Id
    prompt_id: Id
    answer: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    staff_id: Id | None = None


class FootfallEvent(_Event):
    type: Literal["footfall"]
    sensor_id: Id
    period_seconds: int = Field(gt=0, le=86_400)
    count_in: int = Field(alias="in", ge=0, le=1_000_000)
    count_out: int = Field(alias="out", ge=0, le=1_000_000)

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class StockLot(BaseModel):
    model_config = ConfigDict(extra="allow")
    lot: Id
    qty: Qty = Field(ge=0)
    expires_on: date


class StockEvent(_Event):
    type: Literal["stock"]
    sku: Id
    on_hand: Qty = Field(ge=0)
    lots: list[StockLot] = Field(default_factory=list, max_length=500)

    @model_validator(mode="after")
    def _unique_lots(self) -> StockEvent:
        names = [lot.lot for lot in self.lots]
        if len(names) != len(set(names)):
            raise ValueError("lots: the same lot appears twice")
        return self


Event = ReceiptEvent | ConsultationStepEvent | PromptAnswerEvent | FootfallEvent | StockEvent
_MODELS: dict[str, type[_Event]] = {
    "receipt": ReceiptEvent,
    "consultation_step": ConsultationStepEvent,
    "prompt_answer": PromptAnswerEvent,
    "footfall": FootfallEvent,
    "stock": StockEvent,
}


class ContractError(ValueError):
    """A payload breaks the contract; ``str()`` is ``field: reason``."""


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _describe(exc: ValidationError) -> str:
    messages = []
    for error in exc.errors(include_url=False):
        loc = tuple(p for p in error["loc"] if p not in ("function-after",))
        message = error["msg"].removeprefix("Value error, ")
        field = _location(loc)
        if field == "count_in":
            field = "in"
        elif field == "count_out":
            field = "out"
        if error["type"] == "missing":
            message = "required"
        # Model validators already name their field inside the message.
        messages.append(message if not field else f"{field}: {message}")
    return "; ".join(messages)


def parse_event(payload: Any, *, now: datetime | None = None) -> Event:
    """Validate one decoded JSON value against the contract or raise ContractError."""
    if not isinstance(payload, dict):
        raise ContractError(f"event: must be a JSON object, got {type(payload).__name__}")
    event_type = payload.get("type")
    model = _MODELS.get(event_type) if isinstance(event_type, str) else None
    if model is None:
        if event_type is None:
            raise ContractError("type: required")
        raise ContractError(f"type: unknown event type {event_type!r} (expected one of {', '.join(EVENT_TYPES)})")
    try:
        return model.model_validate(payload, context={"now": now})  # type: ignore[return-value]
    except ValidationError as exc:
        raise ContractError(_describe(exc)) from None


EventList = TypeAdapter(list[dict[str, Any]])
