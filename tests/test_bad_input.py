"""Bad input never stops the pipeline: 1,000 generated malformed payloads over MQTT, plus a contract fuzz.

Hypothesis generates the malformed payloads (derandomized, so every run sends the same kinds of
damage): wrong types, missing fields, naive and future timestamps, totals that are not the sum of
the lines, skips without a reason, unknown stores, too many decimals, bytes that are not JSON, JSON
that is not an object, a payload store that is not the topic's, events on the wrong topic, values
out of the rules, halves of UTF-16 surrogate pairs (refused as not JSON, the whole message), broken
batches, and poison events inside batches of good ones. They go interleaved with good receipts to
a running `IngestWorker` on TimescaleDB through the project's Mosquitto. Each bad payload carries a
unique marker that survives into the dead-letter row's raw payload, so the test can tell that
every one of them was dead-lettered exactly once, with a reason that names what is wrong.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from ingest.contract import ContractError, parse_event
from ingest.db import session_scope
from ingest.service import ingest_payloads
from tests import factories as f
from tests.brokers import Broker, mosquitto_broker, publisher, wait_until, worker_thread

BAD_PAYLOADS = 1000
KNOWN_STORES = ("S001", "S002", "S003")
DROP = object()  # a mutation that removes the key


def recent(seconds: int = 0) -> str:
    return (datetime.now(UTC) - timedelta(hours=6) + timedelta(seconds=seconds)).isoformat()


# --- valid events to start from -------------------------------------------------------------


def base_event(kind: str, n: int, store: str) -> dict[str, Any]:
    """A valid event of `kind` for `store`, of the recent past."""
    builders: dict[str, Callable[[int], dict[str, Any]]] = {
        "receipt": lambda n: f.receipt(n, store_id=store, lines=3),
        "return": lambda n: f.receipt(n, store_id=store, lines=2, kind="return"),
        "consultation_step": lambda n: f.step(n) | {"store_id": store},
        "prompt_answer": lambda n: f.prompt_answer(n) | {"store_id": store},
        "footfall": lambda n: f.footfall(n, store_id=store),
        "stock": lambda n: f.stock(n) | {"store_id": store},
    }
    event = builders[kind](n)
    event["occurred_at"] = recent(n % 3600)
    event["event_id"] = f"{kind}-{n}-{uuid.uuid4().hex[:6]}"
    return event


TOPIC_KIND = {
    "receipt": "pos",
    "return": "pos",
    "consultation_step": "pos",
    "prompt_answer": "pos",
    "footfall": "footfall",
    "stock": "stock",
}


def topic_for(prefix: str, store: str, kind: str) -> str:
    return {
        "pos": f"{prefix}/{store}/pos/T1/events",
        "footfall": f"{prefix}/{store}/footfall/door-1",
        "stock": f"{prefix}/{store}/stock",
    }[kind]


# --- the malformed payloads -----------------------------------------------------------------


@dataclass
class BadCase:
    """One malformed payload: `body` is JSON-able, or bytes sent as they are."""

    category: str
    expect: str  # a fragment the dead-letter reason must contain
    body: Any
    store: str = "S001"  # the store of the topic
    topic_kind: str = "pos"
    good_batch_mates: list[dict[str, Any]] = field(default_factory=list)
    # The message as a whole is no JSON: it is dead-lettered as one, batch mates included.
    whole_message: bool = False

    def payload(self, marker: str) -> bytes:
        if isinstance(self.body, bytes):
            return b"{" + marker.encode() + self.body  # "{~" is never valid JSON
        body = copy.deepcopy(self.body)
        if isinstance(body, dict) and isinstance(body.get("events"), list) and self.good_batch_mates:
            body["events"][0]["probe"] = marker  # the poison event is the batch's first
        elif isinstance(body, dict):
            body["probe"] = marker
        elif isinstance(body, list):
            body.append(marker)
        else:
            body = f"{marker} {body}"
        return json.dumps(body, default=str).encode()


stores = st.sampled_from(KNOWN_STORES)
event_kinds = st.sampled_from(list(TOPIC_KIND))
numbers = st.integers(1, 10_000)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.text(max_size=8))
not_a_string = st.one_of(
    st.integers(), st.floats(allow_nan=False), st.booleans(), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip
not_an_amount = st.one_of(
    st.booleans(), st.none(), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers()),
    st.sampled_from(["abc", "12,50", "¥12", "1.2.3", "", "--1", "NaN", "Infinity", "1e999"]),
)  # fmt: skip


wrong_line_no = st.one_of(
    st.floats(0.1, 0.9),
    st.sampled_from(["one", "", "1.5"]),
    st.integers(max_value=0),
    st.integers(min_value=100_001),
    st.lists(st.integers(), max_size=1),
)
wrong_kind = st.one_of(st.integers(), st.text(max_size=5).filter(lambda k: k not in ("sale", "return")))
wrong_lines: st.SearchStrategy[Any] = st.one_of(
    st.just([]), st.text(max_size=5), st.integers(), st.dictionaries(st.text(max_size=3), st.integers(), min_size=1)
)


@st.composite
def wrong_type(draw: st.DrawFn) -> BadCase:
    store = draw(stores)
    event = base_event("receipt", draw(numbers), store)
    path, value = draw(
        st.one_of(
            st.tuples(st.sampled_from(["event_id", "terminal_id", "receipt_id", "store_id"]), not_a_string),
            st.tuples(st.just("occurred_at"), st.one_of(not_a_string, st.none())),
            st.tuples(st.just("kind"), wrong_kind),
            st.tuples(st.just("lines"), wrong_lines),
            st.tuples(st.just("total"), not_an_amount),
            st.tuples(st.sampled_from(["lines[0].qty", "lines[0].unit_price", "lines[0].amount"]), not_an_amount),
            st.tuples(st.just("lines[0].sku"), not_a_string),
            st.tuples(st.just("lines[0].line_no"), wrong_line_no),
        )
    )
    if path.startswith("lines[0]."):
        event["lines"][0][path.removeprefix("lines[0].")] = value
    else:
        event[path] = value
    return BadCase("wrong type", path, event, store)


REQUIRED = {
    "receipt": ["type", "event_id", "store_id", "occurred_at", "terminal_id", "receipt_id", "kind", "lines", "total"],
    "consultation_step": ["type", "event_id", "store_id", "occurred_at", "terminal_id", "consultation_id", "step",
                          "status"],
    "prompt_answer": ["event_id", "occurred_at", "terminal_id", "receipt_id", "sku", "prompt_id", "answer"],
    "footfall": ["event_id", "occurred_at", "sensor_id", "period_seconds", "in", "out"],
    "stock": ["event_id", "occurred_at", "sku", "on_hand"],
}  # fmt: skip
LINE_REQUIRED = ["line_no", "sku", "qty", "unit_price", "amount"]


@st.composite
def missing_field(draw: st.DrawFn) -> BadCase:
    kind = draw(st.sampled_from(list(REQUIRED)))
    store = draw(stores)
    event = base_event(kind, draw(numbers), store)
    options: list[tuple[str, int | None]] = [(name, None) for name in REQUIRED[kind]]
    if kind == "receipt":
        options += [(name, 0) for name in LINE_REQUIRED]
    name, line = draw(st.sampled_from(options))
    if line is None:
        del event[name]
        return BadCase("missing field", f"{name}: required", event, store, TOPIC_KIND[kind])
    del event["lines"][line][name]
    return BadCase("missing field", f"lines[{line}].{name}: required", event, store)


@st.composite
def naive_time(draw: st.DrawFn) -> BadCase:
    kind, store = draw(event_kinds), draw(stores)
    event = base_event(kind, draw(numbers), store)
    moment = draw(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2030, 12, 31)))
    event["occurred_at"] = draw(st.sampled_from([moment.isoformat(), moment.isoformat(" "), moment.date().isoformat()]))
    return BadCase("naive timestamp", "naive timestamps are rejected", event, store, TOPIC_KIND[kind])


@st.composite
def future_time(draw: st.DrawFn) -> BadCase:
    kind, store = draw(event_kinds), draw(stores)
    event = base_event(kind, draw(numbers), store)
    ahead = draw(st.timedeltas(min_value=timedelta(minutes=30), max_value=timedelta(days=3650)))
    offset = timezone(timedelta(minutes=15 * draw(st.integers(-48, 56))))
    event["occurred_at"] = (datetime.now(UTC) + ahead).astimezone(offset).isoformat()
    return BadCase("future timestamp", "in the future", event, store, TOPIC_KIND[kind])


@st.composite
def total_mismatch(draw: st.DrawFn) -> BadCase:
    store = draw(stores)
    event = base_event(draw(st.sampled_from(["receipt", "return"])), draw(numbers), store)
    delta = Decimal(draw(st.integers(-100_000, 100_000).filter(bool))) / 100
    event["total"] = str(Decimal(event["total"]) + delta)
    return BadCase("total is not the sum", "is not the sum of line amounts", event, store)


@st.composite
def skip_without_reason(draw: st.DrawFn) -> BadCase:
    store = draw(stores)
    event = base_event("consultation_step", draw(numbers), store)
    event["step"] = draw(st.sampled_from(["consultation", "symptoms", "recommendation", "insurance_check", "guidance"]))
    event["status"] = "skipped"
    reason = draw(st.sampled_from([DROP, None, "", "   ", "\t\n"]))
    if reason is DROP:
        del event["skip_reason"]
    else:
        event["skip_reason"] = reason
    return BadCase("skip without reason", "skip_reason", event, store)


@st.composite
def unknown_store(draw: st.DrawFn) -> BadCase:
    kind = draw(event_kinds)
    store = draw(st.from_regex(r"\A[A-Z][A-Z0-9]{1,8}\Z").filter(lambda s: s not in KNOWN_STORES))
    return BadCase("unknown store", "unknown store", base_event(kind, draw(numbers), store), store, TOPIC_KIND[kind])


@st.composite
def too_many_decimals(draw: st.DrawFn) -> BadCase:
    store = draw(stores)
    event = base_event("receipt", draw(numbers), store)
    name = draw(st.sampled_from(["unit_price", "amount", "qty", "total"]))
    places = draw(st.integers(4, 7) if name == "qty" else st.integers(3, 6))
    value = Decimal(draw(st.integers(0, 10**6)) * 10 + draw(st.integers(1, 9))).scaleb(-places)
    as_number = draw(st.booleans()) and places <= 6
    rendered: Any = float(value) if as_number else str(value)
    if name == "total":
        event["total"] = rendered
    else:
        event["lines"][draw(st.integers(0, 2))][name] = rendered
    return BadCase("too many decimals", "decimals", event, store)


@st.composite
def not_json(draw: st.DrawFn) -> BadCase:
    tail = draw(
        st.one_of(
            st.binary(max_size=40),
            st.just(b'"type": "receipt", "event_id": "x"'),  # unquoted marker: broken JSON text
            st.binary(min_size=1, max_size=8).map(lambda b: b'": 1, "x": "' + b"\xff\xfe" + b + b'"}'),  # not UTF-8
        )
    )
    return BadCase("not JSON", "not valid JSON", tail, draw(stores))


@st.composite
def not_an_object(draw: st.DrawFn) -> BadCase:
    body = draw(st.one_of(st.lists(json_scalars, max_size=4), st.text(max_size=20)))
    return BadCase("JSON but not an object", "must be a JSON object", body, draw(stores))


@st.composite
def wrong_topic_store(draw: st.DrawFn) -> BadCase:
    kind = draw(event_kinds)
    payload_store, topic_store = draw(st.permutations(KNOWN_STORES))[:2]
    event = base_event(kind, draw(numbers), payload_store)
    return BadCase("store of the topic", "does not match topic store", event, topic_store, TOPIC_KIND[kind])


@st.composite
def wrong_topic_kind(draw: st.DrawFn) -> BadCase:
    kind, store = draw(event_kinds), draw(stores)
    topic_kind = draw(st.sampled_from([k for k in ("pos", "footfall", "stock") if k != TOPIC_KIND[kind]]))
    event = base_event(kind, draw(numbers), store)
    return BadCase("type not for this topic", "events are not accepted on the", event, store, topic_kind)


@st.composite
def unknown_type(draw: st.DrawFn) -> BadCase:
    store = draw(stores)
    event = base_event("receipt", draw(numbers), store)
    value = draw(st.one_of(st.text(max_size=10).filter(lambda t: t not in TOPIC_KIND), st.integers(), st.none()))
    if value is None and draw(st.booleans()):
        del event["type"]
    else:
        event["type"] = value
    return BadCase("unknown type", "type:", event, store)


BROKEN_VALUES: list[tuple[str, str, Callable[[dict[str, Any]], None]]] = [
    ("return", "return lines need a negative qty", lambda e: e["lines"][0].update(qty=abs(e["lines"][0]["qty"]))),
    ("receipt", "duplicate line number", lambda e: e["lines"][1].update(line_no=e["lines"][0]["line_no"])),
    ("receipt", "kind", lambda e: e.update(kind="refund")),
    ("receipt", "event_id", lambda e: e.update(event_id="x" * 65)),
    ("receipt", "event_id", lambda e: e.update(event_id="   ")),
    ("receipt", "is out of range", lambda e: e["lines"][0].update(amount="1e12")),
    ("footfall", "in:", lambda e: e.update({"in": -1})),
    ("footfall", "period_seconds", lambda e: e.update(period_seconds=0)),
    ("footfall", "period_seconds", lambda e: e.update(period_seconds=86_401)),
    ("stock", "the same lot appears twice", lambda e: e["lots"].append(dict(e["lots"][0]))),
    ("stock", "lots[0].expires_on", lambda e: e["lots"][0].update(expires_on="2027-02-30")),
    ("stock", "on_hand", lambda e: e.update(on_hand=-3)),
    ("consultation_step", "data.result", lambda e: e.update(data={"result": "maybe"})),
    ("consultation_step", "step", lambda e: e.update(step="diagnosis")),
    ("consultation_step", "status", lambda e: e.update(status="pending")),
    ("consultation_step", "data.keywords", lambda e: e.update(step="symptoms", data={"keywords": "胸闷"})),
    ("prompt_answer", "answer", lambda e: e.update(answer="")),
]


@st.composite
def broken_value(draw: st.DrawFn) -> BadCase:
    kind, expect, breaks = draw(st.sampled_from(BROKEN_VALUES))
    store = draw(stores)
    event = base_event(kind, draw(numbers), store)
    breaks(event)
    return BadCase("value out of the rules", expect, event, store, TOPIC_KIND[kind])


@st.composite
def unpaired_surrogate(draw: st.DrawFn) -> BadCase:
    """JSON text may escape half of a UTF-16 pair ("\\ud800"). That is no Unicode text (PostgreSQL cannot store
    it), and the worker's strict JSON parser refuses the message as not JSON, like any other syntax error."""
    store = draw(stores)
    event = base_event("receipt", draw(numbers), store)
    half = chr(draw(st.integers(0xD800, 0xDFFF)))
    text_value = draw(st.sampled_from(["", "x", "药"])) + half
    where = draw(st.sampled_from(["sku", "member_id", "terminal_id", "extra", "line extra"]))
    if where == "sku":
        event["lines"][0]["sku"] = text_value
    elif where == "extra":
        event["note"] = text_value
    elif where == "line extra":
        event["lines"][0]["note"] = text_value
    else:
        event[where] = text_value
    return BadCase("unpaired surrogate", "surrogate", event, store, whole_message=True)


@st.composite
def broken_batch(draw: st.DrawFn) -> BadCase:
    not_a_list = st.one_of(st.text(max_size=5), st.integers(), st.none(), st.dictionaries(st.text(max_size=3), numbers))
    return BadCase("batch is not a list", "events: must be a list", {"events": draw(not_a_list)}, draw(stores))


@st.composite
def poison_in_batch(draw: st.DrawFn) -> BadCase:
    """A bad event first, then good events of the same store, in one message: only the bad one goes."""
    damage = st.one_of(
        wrong_type(), missing_field(), naive_time(), total_mismatch(), too_many_decimals(), future_time(),
        broken_value(), unpaired_surrogate(),
    )  # fmt: skip
    inner = draw(damage.filter(lambda c: c.topic_kind == "pos"))
    mates = [base_event("receipt", draw(numbers), inner.store) for _ in range(draw(st.integers(1, 3)))]
    for mate in mates:
        mate["event_id"] = f"good-mate-{uuid.uuid4().hex[:12]}"
    return BadCase(f"poison in a batch: {inner.category}", inner.expect, {"events": [inner.body, *mates]},
                   inner.store, good_batch_mates=mates, whole_message=inner.whole_message)  # fmt: skip


def bad_case() -> st.SearchStrategy[BadCase]:
    return st.one_of(
        wrong_type(), missing_field(), naive_time(), future_time(), total_mismatch(), skip_without_reason(),
        unknown_store(), too_many_decimals(), not_json(), not_an_object(), wrong_topic_store(), wrong_topic_kind(),
        unknown_type(), broken_value(), unpaired_surrogate(), broken_batch(), poison_in_batch(),
    )  # fmt: skip


def generate_bad_cases(count: int) -> list[BadCase]:
    """`count` malformed payloads drawn by Hypothesis, the same kinds on every run (derandomized)."""
    cases: list[BadCase] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(bad_case())
    def collect(case: BadCase) -> None:
        cases.append(case)

    collect()
    return cases


# --- over MQTT ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    with mosquitto_broker() as running:
        yield running


def stored_receipt_ids(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(text("SELECT event_id FROM receipts")))


def dead_letter_rows(engine: Engine) -> list[tuple[str, str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT reason, raw_payload, source FROM dead_letters ORDER BY id")).all()
    return [(r, p, s) for r, p, s in rows]


def test_generated_bad_payloads_are_dead_lettered_and_the_worker_keeps_going(
    pg_chain: Engine, timescale_url: str, broker: Broker
) -> None:
    cases = generate_bad_cases(BAD_PAYLOADS)
    assert len(cases) == BAD_PAYLOADS, f"Hypothesis produced {len(cases)} payloads"
    categories = Counter(c.category.split(":")[0] for c in cases)
    assert len(categories) == 17, f"not every kind of damage was generated: {categories}"

    run = uuid.uuid4().hex[:8]
    prefix = f"storepulse-bad-{run}/v1"
    markers = {f"~BAD:{run}:{i:04d}~": case for i, case in enumerate(cases)}
    good = [mate["event_id"] for case in cases if not case.whole_message for mate in case.good_batch_mates]

    with worker_thread(timescale_url, broker, topic_prefix=prefix) as worker, publisher(broker) as pub:
        for i, (marker, case) in enumerate(markers.items()):
            pub.publish(topic_for(prefix, case.store, case.topic_kind), case.payload(marker))
            if i % 2:  # a good receipt after every second bad payload
                event = base_event("receipt", i, KNOWN_STORES[i % 3]) | {"event_id": f"good-{run}-{i}"}
                pub.publish(topic_for(prefix, event["store_id"], "pos"), json.dumps(event))
                good.append(event["event_id"])
        pub.wait_all(timeout=60)
        wait_until(lambda: len(dead_letter_rows(pg_chain)) >= len(cases), 60, f"{len(cases)} dead letters", 0.5)

        # After all of that, the worker still consumes.
        final = base_event("receipt", 1, "S002") | {"event_id": f"final-{run}"}
        pub.publish(topic_for(prefix, "S002", "pos"), json.dumps(final))
        wait_until(lambda: final["event_id"] in stored_receipt_ids(pg_chain), 30, "the final good receipt")
        assert worker.alive()

    stored = stored_receipt_ids(pg_chain)
    letters = dead_letter_rows(pg_chain)
    lost = sorted(set(good) - stored)
    where = [reason for reason, raw, _ in letters if lost and lost[0] in raw]
    assert lost == [], f"{len(lost)} good events were not stored; the first one is in dead letters {where}"
    assert stored == set(good) | {final["event_id"]}, "something bad was stored"
    assert sum(len(c.good_batch_mates) for c in cases if not c.whole_message) >= 50, "few poison batches"

    assert len(letters) == len(cases), f"{len(letters)} dead letters for {len(cases)} bad payloads"
    problems = []
    for marker, case in markers.items():
        matching = [(reason, raw) for reason, raw, _ in letters if marker in raw]
        if len(matching) != 1:
            problems.append(f"{case.category}: {len(matching)} dead letters for {case.payload(marker)[:300]!r}")
            continue
        reason, raw = matching[0]
        if not reason.strip() or case.expect not in reason:
            problems.append(f"{case.category}: reason {reason!r} does not mention {case.expect!r} ({raw[:200]})")
        if case.whole_message and not all(m["event_id"] in raw for m in case.good_batch_mates):
            problems.append(f"{case.category}: the batch mates are not in the dead-lettered message")
    assert problems == [], f"{len(problems)} bad payloads mishandled:\n" + "\n".join(problems[:20])
    assert {source for _, _, source in letters} <= {
        f"mqtt:{topic_for(prefix, s, k)}" for s in {c.store for c in cases} for k in ("pos", "footfall", "stock")
    }


# --- the contract on arbitrary JSON ---------------------------------------------------------

# Text with the characters that trip storage up: NUL and halves of UTF-16 surrogate pairs.
any_text = st.text(
    st.one_of(st.characters(), st.sampled_from("\x00\ud800\udfff\u2028"), st.characters(min_codepoint=0xD800,
              max_codepoint=0xDFFF, exclude_categories=())),
    max_size=12,
)  # fmt: skip
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), any_text),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
timestamps = st.one_of(
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.datetimes().map(lambda d: d.isoformat()),
    any_text,
)


@st.composite
def mutated_events(draw: st.DrawFn) -> Any:
    """A valid event with a few fields replaced by arbitrary JSON, removed, or given odd timestamps."""
    kind = draw(event_kinds)
    event: dict[str, Any] = base_event(kind, draw(numbers), draw(stores))
    for _ in range(draw(st.integers(1, 4))):
        target = event
        nested = event.get("lines" if kind in ("receipt", "return") else "lots")
        if isinstance(nested, list) and nested and isinstance(nested[0], dict) and draw(st.booleans()):
            target = nested[0]
        key = draw(st.one_of(st.sampled_from(sorted(target)), any_text))
        action = draw(st.sampled_from(["replace", "drop", "time"]))
        if action == "drop":
            target.pop(key, None)
        elif action == "time":
            target[key] = draw(timestamps)
        else:
            target[key] = draw(json_values)
    return event


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_values, mutated_events()))
def test_parse_event_raises_only_contract_errors(payload: Any) -> None:
    try:
        event = parse_event(payload)
    except ContractError as exc:
        assert str(exc).strip(), "a rejection without a reason"
        return
    # Whatever passes is a well-formed event of the contract.
    assert event.type in TOPIC_KIND
    assert event.occurred_at.utcoffset() is not None


# --- the same damage through the service (the HTTP API's path) ------------------------------


@pytest.mark.parametrize("where", ["sku", "extra field"])
def test_service_rejects_an_unpaired_surrogate_per_event(chain: Engine, where: str) -> None:
    good = base_event("receipt", 1, "S001")
    bad = base_event("receipt", 2, "S001")
    half = json.loads('"\\ud800"')
    if where == "sku":
        bad["lines"][0]["sku"] = half
    else:
        bad["note"] = half
    with session_scope(chain) as session:
        results = ingest_payloads([good, bad], session=session, source="test")
    assert [r.status for r in results] == ["accepted", "rejected"]
    assert stored_receipt_ids(chain) == {good["event_id"]}
    assert len(dead_letter_rows(chain)) == 1
