"""A fast path of the contract for the payloads tills send every second.

`parse_fast` accepts a payload only when every rule of ingest/contract_models.py holds, and then
returns the very pydantic instances `model_validate` would build, assembled without validating
them again. On any error, and on anything unusual (a float amount, an id with spaces round it,
a string where a number belongs, a `count_in` key), it returns None, and `parse_event` runs the
pydantic models, which own every error message. So this module only decides acceptance and
never words an error.

Receipts, footfall and consultation steps take the fast path; prompt answers and stock
snapshots are rare and always take the models. The field lists of the models are checked at
import: if contract_models.py gains or reorders a field, the types concerned fall back to the models
until this module is updated (tests/test_fast_contract.py fails meanwhile). A changed rule is
caught by that test's differential corpus and mutations, which compare both paths.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel

from ingest.contract_models import (
    EARLIEST_YEAR,
    MAX_FUTURE,
    STEPS,
    ConsultationStepEvent,
    Customer,
    Event,
    FootfallEvent,
    ReceiptDiscount,
    ReceiptEvent,
    ReceiptLine,
    ReceiptSource,
    Tender,
    _invalid_text_at,
)
from ingest.settings import get_settings

FastParser = Callable[[dict[str, Any], datetime, bool | None], Event | None]

# The field order of each model as this module builds it; a model that differs takes the slow path.
EXPECTED_FIELDS: dict[type[BaseModel], tuple[str, ...]] = {
    ReceiptEvent: (
        "event_id", "store_id", "occurred_at", "type", "terminal_id", "receipt_id", "kind", "staff_id",
        "member_id", "consultation_id", "lines", "discounts", "tax", "prices_include_tax", "tenders",
        "rounding", "source", "total",
    ),
    ReceiptLine: ("line_no", "sku", "qty", "unit_price", "amount", "discount", "promotion_id"),
    ReceiptDiscount: ("kind", "amount", "reason", "id"),
    Tender: ("type", "amount"),
    ReceiptSource: ("name",),
    FootfallEvent: (
        "event_id", "store_id", "occurred_at", "type", "sensor_id", "period_seconds", "count_in", "count_out",
    ),
    ConsultationStepEvent: (
        "event_id", "store_id", "occurred_at", "type", "terminal_id", "consultation_id", "staff_id",
        "customer", "step", "status", "skip_reason", "data",
    ),
    Customer: ("member_id", "name"),
}  # fmt: skip

_RECEIPT_FIELDS = frozenset(EXPECTED_FIELDS[ReceiptEvent])
_LINE_FIELDS = frozenset(EXPECTED_FIELDS[ReceiptLine])
_DISCOUNT_FIELDS = frozenset(EXPECTED_FIELDS[ReceiptDiscount])
_TENDER_FIELDS = frozenset(EXPECTED_FIELDS[Tender])
_SOURCE_FIELDS = frozenset(EXPECTED_FIELDS[ReceiptSource])
_CUSTOMER_FIELDS = frozenset(EXPECTED_FIELDS[Customer])
# The payload spells the footfall counts by their aliases.
_FOOTFALL_KEYS = frozenset(("event_id", "store_id", "occurred_at", "type", "sensor_id", "period_seconds", "in", "out"))
_STEP_FIELDS = frozenset(EXPECTED_FIELDS[ConsultationStepEvent])

_ZERO = Decimal(0)
_LINE_DISCOUNT_DEFAULT = ReceiptLine.model_fields["discount"].default
_ROUNDING_DEFAULT = ReceiptEvent.model_fields["rounding"].default
_LIMIT = 10**11
# Plain decimal texts only; exponents, signs, spaces and non-ASCII digits go to the models.
_AMOUNT_TEXT = re.compile(r"-?[0-9]{1,11}(?:\.[0-9]{1,2})?").fullmatch
_QTY_TEXT = re.compile(r"-?[0-9]{1,11}(?:\.[0-9]{1,3})?").fullmatch
# Prices and quantities repeat from receipt to receipt; Decimal is immutable, so parsed values are shared.
_CACHE_SIZE = 50_000
# Keys are str or int only (never bool or float, which would hash equal to an int).
_amounts: dict[Any, Decimal] = {}
_quantities: dict[Any, Decimal] = {}
_ids: set[str] = set()
_keys: set[str] = set()

_new = object.__new__
_set = object.__setattr__
_fromisoformat = datetime.fromisoformat
_now = datetime.now


def _model(cls: type[BaseModel], values: dict[str, Any], fields_set: set[str], extra: dict[str, Any]) -> Any:
    """What model_validate would return for these already valid values (what model_construct does)."""
    instance = _new(cls)
    _set(instance, "__dict__", values)
    _set(instance, "__pydantic_fields_set__", fields_set)
    _set(instance, "__pydantic_extra__", extra)
    _set(instance, "__pydantic_private__", None)
    return instance


def _text_ok(value: str) -> bool:
    """Whether pydantic takes the string as it is: no lone surrogate."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_id(value: Any) -> bool:
    if type(value) is not str:
        return False
    if value in _ids:
        return True
    # Only ids that stripping leaves alone: Python strips more characters than pydantic does.
    if not (0 < len(value) <= 64 and "\x00" not in value and value.strip() == value and _text_ok(value)):
        return False
    if len(_ids) >= _CACHE_SIZE:
        _ids.clear()
    _ids.add(value)
    return True


def _is_short_text(value: Any, limit: int, nul_allowed: bool = False) -> bool:
    return type(value) is str and len(value) <= limit and (nul_allowed or "\x00" not in value) and _text_ok(value)


def _parsed(value: Any, text: Callable[[str], Any], cache: dict[Any, Decimal]) -> Decimal | None:
    """The Decimal the models make of a plain decimal text or an int; None for anything else."""
    kind = type(value)
    if kind is str:
        if not text(value):
            return None
    elif kind is not int or not -_LIMIT < value < _LIMIT:
        return None
    number = Decimal(value)
    if len(cache) >= _CACHE_SIZE:
        cache.clear()
    cache[value] = number
    return number


def _amount(value: Any) -> Decimal | None:
    kind = type(value)
    if kind is str or kind is int:
        number = _amounts.get(value)
        if number is not None:
            return number
    return _parsed(value, _AMOUNT_TEXT, _amounts)


def _quantity(value: Any) -> Decimal | None:
    kind = type(value)
    if kind is str or kind is int:
        number = _quantities.get(value)
        if number is not None:
            return number
    return _parsed(value, _QTY_TEXT, _quantities)


def _event_time(value: Any, now: datetime) -> datetime | None:
    if type(value) is not str:
        return None
    try:
        parsed = _fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None or parsed.utcoffset() is None or parsed.year < EARLIEST_YEAR:
        return None
    if parsed - now > MAX_FUTURE:
        return None
    return parsed


def _extra(item: dict[str, Any], fields: frozenset[str]) -> dict[str, Any] | None:
    """The unknown keys of a nested object (kept, not checked, as the models do); None if a key is odd."""
    if len(item) <= len(fields) and fields.issuperset(item):
        return {}
    extra = {key: value for key, value in item.items() if key not in fields}
    for key in extra:
        if key not in _keys:
            if type(key) is not str or not _text_ok(key):
                return None
            if len(_keys) >= _CACHE_SIZE:
                _keys.clear()
            _keys.add(key)
    return extra


def _event_extra(payload: dict[str, Any], fields: frozenset[str], data: Any = None) -> dict[str, Any] | None:
    """Unknown top-level keys, with the models' check of free text (NUL, lone surrogates); None if refused."""
    extra = _extra(payload, fields)
    if extra is None:
        return None
    if data is None:
        # The models read `data` as an attribute, which an unknown key of that name also answers.
        data = extra.get("data")
    if (extra or data is not None) and _invalid_text_at({**extra, "data": data}, ""):
        return None
    return extra


def _nested(cls: type[BaseModel], values: dict[str, Any], item: dict[str, Any], fields: frozenset[str]) -> Any:
    """The nested model of checked values, its unknown keys kept; None if one of those keys is odd."""
    extra = _extra(item, fields)
    return None if extra is None else _model(cls, values, set(item), extra)


def _items(raw: Any, parse: Callable[[Any, bool], Any], is_return: bool) -> list[Any] | None:
    """A list of at most 1000 nested objects, each accepted by `parse`; None if any is not."""
    if type(raw) is not list or len(raw) > 1000:
        return None
    items = []
    for raw_item in raw:
        item = parse(raw_item, is_return)
        if item is None:
            return None
        items.append(item)
    return items


def _line(item: Any, is_return: bool) -> ReceiptLine | None:
    # The hottest loop of the worker: the common case is inlined (cache hits, no unknown keys).
    if type(item) is not dict:
        return None
    try:
        line_no = item["line_no"]
        sku = item["sku"]
        raw_qty = item["qty"]
        raw_price = item["unit_price"]
        raw_amount = item["amount"]
    except KeyError:
        return None
    if (
        type(line_no) is not int
        or not 1 <= line_no <= 100_000
        or not ((type(sku) is str and sku in _ids) or _is_id(sku))
    ):
        return None
    kind = type(raw_qty)
    qty = (_quantities.get(raw_qty) if kind is str or kind is int else None) or _quantity(raw_qty)
    kind = type(raw_price)
    unit_price = (_amounts.get(raw_price) if kind is str or kind is int else None) or _amount(raw_price)
    kind = type(raw_amount)
    amount = (_amounts.get(raw_amount) if kind is str or kind is int else None) or _amount(raw_amount)
    if qty is None or unit_price is None or amount is None:
        return None
    if is_return and (qty >= 0 or amount > 0):
        return None
    size = len(item)
    if "discount" in item:
        discount = _amount(item["discount"])
        if discount is None:
            return None
        if discount and (discount * amount < 0 or abs(discount) > abs(amount)):
            return None
    else:
        discount = _LINE_DISCOUNT_DEFAULT
    promotion_id = item.get("promotion_id")
    if promotion_id is not None and not _is_id(promotion_id):
        return None
    if size <= 7 and _LINE_FIELDS.issuperset(item):
        extra: dict[str, Any] | None = {}
    else:
        extra = _extra(item, _LINE_FIELDS)
        if extra is None:
            return None
    instance = _new(ReceiptLine)
    _set(
        instance,
        "__dict__",
        {
            "line_no": line_no,
            "sku": sku,
            "qty": qty,
            "unit_price": unit_price,
            "amount": amount,
            "discount": discount,
            "promotion_id": promotion_id,
        },
    )
    _set(instance, "__pydantic_fields_set__", set(item))
    _set(instance, "__pydantic_extra__", extra)
    _set(instance, "__pydantic_private__", None)
    return instance


def _receipt_discount(item: Any, is_return: bool) -> ReceiptDiscount | None:
    if type(item) is not dict:
        return None
    kind = item.get("kind")
    amount = _amount(item.get("amount"))
    reason = item.get("reason")
    discount_id = item.get("id")
    if (
        type(kind) is not str
        or kind not in ("discount", "reward", "coupon")
        or amount is None
        or ((amount > 0) if is_return else (amount < 0))
        or (reason is not None and not _is_short_text(reason, 200))
        or (discount_id is not None and not _is_id(discount_id))
    ):
        return None
    values = {"kind": kind, "amount": amount, "reason": reason, "id": discount_id}
    return _nested(ReceiptDiscount, values, item, _DISCOUNT_FIELDS)


def _tender(item: Any, _is_return: bool) -> Tender | None:
    if type(item) is not dict:
        return None
    tender_type = item.get("type")
    amount = _amount(item.get("amount"))
    if not _is_id(tender_type) or amount is None:
        return None
    return _nested(Tender, {"type": tender_type, "amount": amount}, item, _TENDER_FIELDS)


def _source(item: Any) -> ReceiptSource | None:
    if type(item) is not dict:
        return None
    name = item.get("name")
    if not _is_id(name):
        return None
    extra = _extra(item, _SOURCE_FIELDS)
    if extra is None:
        return None
    for value in extra.values():
        if value is not None and not (type(value) is str and len(value) <= 64 and "\x00" not in value):
            return None
    return _model(ReceiptSource, {"name": name}, set(item), extra)


def _receipt(payload: dict[str, Any], now: datetime, chain_prices_include_tax: bool | None) -> ReceiptEvent | None:
    get = payload.get
    event_id = get("event_id")
    store_id = get("store_id")
    terminal_id = get("terminal_id")
    receipt_id = get("receipt_id")
    kind = get("kind")
    staff_id = get("staff_id")
    member_id = get("member_id")
    consultation_id = get("consultation_id")
    if not (
        _is_id(event_id)
        and _is_id(receipt_id)
        and ((type(store_id) is str and store_id in _ids) or _is_id(store_id))
        and ((type(terminal_id) is str and terminal_id in _ids) or _is_id(terminal_id))
        and (kind == "sale" or kind == "return")
        and type(kind) is str
        and (staff_id is None or (type(staff_id) is str and staff_id in _ids) or _is_id(staff_id))
        and (member_id is None or _is_id(member_id))
        and (consultation_id is None or _is_id(consultation_id))
    ):
        return None
    occurred_at = _event_time(get("occurred_at"), now)
    raw_lines = get("lines")
    total = _amount(get("total"))
    if occurred_at is None or type(raw_lines) is not list or not 1 <= len(raw_lines) <= 1000 or total is None:
        return None
    is_return = kind == "return"
    lines = []
    line_numbers = set()
    line_sum = _ZERO
    line_discounts = _ZERO
    for raw_line in raw_lines:
        line = _line(raw_line, is_return)
        if line is None:
            return None
        values = line.__dict__
        line_numbers.add(values["line_no"])
        line_sum += values["amount"]
        line_discounts += values["discount"]
        lines.append(line)
    if len(line_numbers) != len(lines):
        return None

    receipt_discounts: list[ReceiptDiscount] | None = []
    receipt_discount_sum = _ZERO
    if "discounts" in payload:
        receipt_discounts = _items(payload["discounts"], _receipt_discount, is_return)
        if receipt_discounts is None:
            return None
        for discount in receipt_discounts:
            receipt_discount_sum += discount.__dict__["amount"]
    tax = get("tax")
    if tax is not None:
        tax = _amount(tax)
        if tax is None or ((tax > 0) if is_return else (tax < 0)):
            return None
    prices_include_tax = get("prices_include_tax")
    if prices_include_tax is not None and type(prices_include_tax) is not bool:
        return None
    tenders = get("tenders")
    if tenders is not None:
        tenders = _items(tenders, _tender, is_return)
        if tenders is None:
            return None
    if "rounding" in payload:
        rounding = _amount(payload["rounding"])
        if rounding is None:
            return None
    else:
        rounding = _ROUNDING_DEFAULT
    source = get("source")
    if source is not None:
        source = _source(source)
        if source is None:
            return None

    # The same sums, in the same order, as ReceiptEvent's properties.
    discount_total = line_discounts + receipt_discount_sum
    net_sales = line_sum - discount_total
    if discount_total and ((net_sales > 0) if is_return else (net_sales < 0)):
        return None
    if not (receipt_discounts or tax is not None or rounding or line_discounts):
        if net_sales != total:
            return None
    else:
        if prices_include_tax is None:
            includes_tax = (
                get_settings().prices_include_tax if chain_prices_include_tax is None else chain_prices_include_tax
            )
        else:
            includes_tax = prices_include_tax
        added_tax = _ZERO if includes_tax else (tax or _ZERO)
        if net_sales + added_tax + rounding != total:
            return None

    extra: dict[str, Any] | None = {}
    if len(payload) > len(_RECEIPT_FIELDS) or not _RECEIPT_FIELDS.issuperset(payload):
        extra = _event_extra(payload, _RECEIPT_FIELDS)
    if extra is None:
        return None
    values = {
        "event_id": event_id,
        "store_id": store_id,
        "occurred_at": occurred_at,
        "type": "receipt",
        "terminal_id": terminal_id,
        "receipt_id": receipt_id,
        "kind": kind,
        "staff_id": staff_id,
        "member_id": member_id,
        "consultation_id": consultation_id,
        "lines": lines,
        "discounts": receipt_discounts,
        "tax": tax,
        "prices_include_tax": prices_include_tax,
        "tenders": tenders,
        "rounding": rounding,
        "source": source,
        "total": total,
    }
    return _model(ReceiptEvent, values, set(payload), extra)


def _count(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _footfall(payload: dict[str, Any], now: datetime, _chain_prices_include_tax: bool | None) -> FootfallEvent | None:
    get = payload.get
    event_id = get("event_id")
    store_id = get("store_id")
    sensor_id = get("sensor_id")
    period_seconds = get("period_seconds")
    count_in = get("in")
    count_out = get("out")
    if not (
        _is_id(event_id)
        and _is_id(store_id)
        and _is_id(sensor_id)
        and _count(period_seconds, 1, 86_400)
        and _count(count_in, 0, 1_000_000)
        and _count(count_out, 0, 1_000_000)
    ):
        return None
    occurred_at = _event_time(get("occurred_at"), now)
    # Keys named like the fields rather than their aliases: the models decide which one wins.
    if occurred_at is None or "count_in" in payload or "count_out" in payload:
        return None
    extra = _event_extra(payload, _FOOTFALL_KEYS)
    if extra is None:
        return None
    values = {
        "event_id": event_id,
        "store_id": store_id,
        "occurred_at": occurred_at,
        "type": "footfall",
        "sensor_id": sensor_id,
        "period_seconds": period_seconds,
        "count_in": count_in,
        "count_out": count_out,
    }
    fields_set = {"count_in" if k == "in" else "count_out" if k == "out" else k for k in payload}
    return _model(FootfallEvent, values, fields_set, extra)


def _customer(item: Any) -> Customer | None:
    if type(item) is not dict:
        return None
    member_id = item.get("member_id")
    name = item.get("name")
    if (member_id is not None and not _is_id(member_id)) or (
        name is not None and not _is_short_text(name, 100, nul_allowed=True)
    ):
        return None
    return _nested(Customer, {"member_id": member_id, "name": name}, item, _CUSTOMER_FIELDS)


def _is_text_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _consultation_step(
    payload: dict[str, Any], now: datetime, _chain_prices_include_tax: bool | None
) -> ConsultationStepEvent | None:
    get = payload.get
    event_id = get("event_id")
    store_id = get("store_id")
    terminal_id = get("terminal_id")
    consultation_id = get("consultation_id")
    staff_id = get("staff_id")
    step = get("step")
    status = get("status")
    skip_reason = get("skip_reason")
    if not (
        _is_id(event_id)
        and _is_id(store_id)
        and _is_id(terminal_id)
        and _is_id(consultation_id)
        and (staff_id is None or _is_id(staff_id))
        and type(step) is str
        and step in STEPS
        and type(status) is str
        and status in ("done", "skipped")
        and (skip_reason is None or _is_short_text(skip_reason, 200))
    ):
        return None
    occurred_at = _event_time(get("occurred_at"), now)
    if occurred_at is None:
        return None
    customer = get("customer")
    if customer is not None:
        customer = _customer(customer)
        if customer is None:
            return None
    data = get("data")
    if data is not None:
        if type(data) is not dict or not all(type(key) is str for key in data):
            return None
        data = dict(data)
    # The rules of ConsultationStepEvent._step_rules.
    if status == "skipped" and not (skip_reason and skip_reason.strip()):
        return None
    checked = data or {}
    if status == "done" and step == "insurance_check" and checked.get("result") not in ("pass", "fail"):
        return None
    if "keywords" in checked and not _is_text_list(checked["keywords"]):
        return None
    if "skus" in checked and not _is_text_list(checked["skus"]):
        return None
    extra = _event_extra(payload, _STEP_FIELDS, data)
    if extra is None:
        return None
    values = {
        "event_id": event_id,
        "store_id": store_id,
        "occurred_at": occurred_at,
        "type": "consultation_step",
        "terminal_id": terminal_id,
        "consultation_id": consultation_id,
        "staff_id": staff_id,
        "customer": customer,
        "step": step,
        "status": status,
        "skip_reason": skip_reason,
        "data": data,
    }
    return _model(ConsultationStepEvent, values, set(payload), extra)


def _matching_contract(*models: type[BaseModel]) -> bool:
    return all(tuple(model.model_fields) == EXPECTED_FIELDS[model] for model in models)


def _parsers() -> dict[str, FastParser]:
    candidates: dict[str, tuple[FastParser, tuple[type[BaseModel], ...]]] = {
        "receipt": (_receipt, (ReceiptEvent, ReceiptLine, ReceiptDiscount, Tender, ReceiptSource)),
        "footfall": (_footfall, (FootfallEvent,)),
        "consultation_step": (_consultation_step, (ConsultationStepEvent, Customer)),
    }
    return {name: parser for name, (parser, models) in candidates.items() if _matching_contract(*models)}


FAST_TYPES: dict[str, FastParser] = _parsers()


def parse_fast(payload: Any, *, now: datetime | None = None, prices_include_tax: bool | None = None) -> Event | None:
    """The event when the payload is plainly valid, else None (the models then decide and word the error)."""
    if type(payload) is not dict:
        return None
    event_type = payload.get("type")
    parser = FAST_TYPES.get(event_type) if type(event_type) is str else None
    if parser is None:
        return None
    return parser(payload, now or _now(UTC), prices_include_tax)


@contextmanager
def models_only() -> Iterator[None]:
    """Run every payload through the pydantic models meanwhile (the benchmarks and tests compare both paths)."""
    global FAST_TYPES
    saved = FAST_TYPES
    FAST_TYPES = {}
    try:
        yield
    finally:
        FAST_TYPES = saved
