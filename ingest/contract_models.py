"""The models of the public event contract v1: one pydantic model per event type, and the rules.

`ingest.contract` is the contract's public face (it re-exports these names and adds the fast
path); the fast path (`ingest.fast_contract`) mirrors these models. Errors are reported as
``field: reason`` so a till developer can fix the payload without reading our code.
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

from ingest.settings import get_settings

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
    # Price modifiers and line rewards, signed like `amount`; `amount` stays the pre-discount figure.
    discount: Amount = Decimal(0)
    promotion_id: Id | None = None

    @model_validator(mode="after")
    def _discount_within_amount(self) -> ReceiptLine:
        if self.discount and (self.discount * self.amount < 0 or abs(self.discount) > abs(self.amount)):
            raise ValueError(
                f"discount: {self.discount} must have the sign of the line amount ({self.amount}) "
                "and be no larger than it"
            )
        return self


class ReceiptDiscount(BaseModel):
    model_config = ConfigDict(extra="allow")
    kind: Literal["discount", "reward", "coupon"]
    amount: Amount
    reason: ShortText | None = None
    id: Id | None = None


class Tender(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Id
    # Signed: change handed back is a negative cash tender, a refund a negative one too.
    amount: Amount


SourceText = Annotated[str, StringConstraints(max_length=64, pattern=r"^[^\x00]*$")]


class ReceiptSource(BaseModel):
    """The till system's own ids for the receipt, kept so a row can be traced back to its source."""

    model_config = ConfigDict(extra="allow")
    name: Id

    @model_validator(mode="after")
    def _text_ids(self) -> ReceiptSource:
        for key, value in (self.model_extra or {}).items():
            if value is not None and not (isinstance(value, str) and len(value) <= 64 and "\x00" not in value):
                raise ValueError(f"{key!r} must be text of at most 64 characters")
        return self


def _source_shorthand(value: Any) -> Any:
    # Before `source` was part of the contract, senders (the online-retail adapter among them)
    # put a plain name there: it still means the source's name, and one that cannot be a name
    # stays what it was then, an extra field kept in the raw payload only.
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("text with a NUL character cannot be stored")
        name = value.strip()
        return {"name": name} if 0 < len(name) <= 64 else None
    if value is not None and not isinstance(value, dict | ReceiptSource):
        raise ValueError('must be an object with a name, e.g. {"name": "poslog"}')
    return value


def _sum(values: Any) -> Decimal:
    return sum(values, Decimal(0))


class ReceiptEvent(_Event):
    type: Literal["receipt"]
    terminal_id: Id
    receipt_id: Id
    kind: Literal["sale", "return"]
    staff_id: Id | None = None
    member_id: Id | None = None
    consultation_id: Id | None = None
    lines: list[ReceiptLine] = Field(min_length=1, max_length=1000)
    discounts: list[ReceiptDiscount] = Field(default_factory=list, max_length=1000)
    tax: Amount | None = None
    # None: the chain's Settings.prices_include_tax decides (kept None in storage too).
    prices_include_tax: bool | None = None
    tenders: list[Tender] | None = Field(default=None, max_length=1000)
    rounding: Amount = Decimal(0)
    source: Annotated[ReceiptSource | None, BeforeValidator(_source_shorthand)] = None
    total: Amount

    @property
    def line_discount_total(self) -> Decimal:
        return _sum(line.discount for line in self.lines)

    @property
    def receipt_discount_total(self) -> Decimal:
        return _sum(discount.amount for discount in self.discounts)

    @property
    def discount_total(self) -> Decimal:
        """Every discount, reward and coupon of the receipt, line and receipt level."""
        return self.line_discount_total + self.receipt_discount_total

    @property
    def net_sales(self) -> Decimal:
        """Σ line amounts − Σ line discounts − Σ receipt discounts, before tax and rounding."""
        return _sum(line.amount for line in self.lines) - self.discount_total

    def prices_include_tax_or(self, chain_default: bool) -> bool:
        return chain_default if self.prices_include_tax is None else self.prices_include_tax

    def expected_total(self, *, chain_prices_include_tax: bool) -> Decimal:
        """What `total` must be: net + tax when prices exclude it + cash rounding."""
        added_tax = self.tax or Decimal(0)
        if self.prices_include_tax_or(chain_prices_include_tax):
            added_tax = Decimal(0)
        return self.net_sales + added_tax + self.rounding

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> ReceiptEvent:
        seen: set[int] = set()
        sign = Decimal(-1) if self.kind == "return" else Decimal(1)
        for index, line in enumerate(self.lines):
            if line.line_no in seen:
                raise ValueError(f"lines[{index}].line_no: duplicate line number {line.line_no}")
            seen.add(line.line_no)
            if self.kind == "return" and (line.qty >= 0 or line.amount > 0):
                raise ValueError(f"lines[{index}]: return lines need a negative qty and amount")
        for index, discount in enumerate(self.discounts):
            if discount.amount * sign < 0:
                raise ValueError(f"discounts[{index}].amount: {discount.amount} must be {_signed(self.kind)}")
        if self.tax is not None and self.tax * sign < 0:
            raise ValueError(f"tax: {self.tax} must be {_signed(self.kind)}")
        if self.discount_total and self.net_sales * sign < 0:
            raise ValueError(
                f"discounts: the discounts ({self.discount_total}) exceed the line amounts "
                f"({self.net_sales + self.discount_total})"
            )
        if not (self.discounts or self.tax is not None or self.rounding or self.line_discount_total):
            # A v1 receipt: keep the v1 rule and its message.
            line_sum = self.net_sales
            if line_sum != self.total:
                raise ValueError(f"total: {self.total} is not the sum of line amounts ({line_sum})")
            return self
        chain_default = (info.context or {}).get("prices_include_tax")
        if chain_default is None:
            chain_default = get_settings().prices_include_tax
        expected = self.expected_total(chain_prices_include_tax=chain_default)
        if expected != self.total:
            added_tax = expected - self.net_sales - self.rounding
            raise ValueError(
                f"total: {self.total} does not reconcile; expected {expected} = net sales {self.net_sales} "
                f"(line amounts {self.net_sales + self.discount_total} - discounts {self.discount_total})"
                f" + tax added to prices {added_tax} + rounding {self.rounding}"
            )
        return self


def _signed(kind: str) -> str:
    return "0 or negative on a return" if kind == "return" else "0 or positive on a sale"


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


def parse_with_models(payload: Any, *, now: datetime | None = None, prices_include_tax: bool | None = None) -> Event:
    """Validate one decoded JSON value with the models, which word every error (`ingest.contract.parse_event`)."""
    if not isinstance(payload, dict):
        raise ContractError(f"event: must be a JSON object, got {type(payload).__name__}")
    event_type = payload.get("type")
    model = _MODELS.get(event_type) if isinstance(event_type, str) else None
    if model is None:
        if event_type is None:
            raise ContractError("type: required")
        raise ContractError(f"type: unknown event type {event_type!r} (expected one of {', '.join(EVENT_TYPES)})")
    try:
        return model.model_validate(payload, context={"now": now, "prices_include_tax": prices_include_tax})  # type: ignore[return-value]
    except ValidationError as exc:
        raise ContractError(_describe(exc)) from None


EventList = TypeAdapter(list[dict[str, Any]])
