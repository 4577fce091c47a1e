"""POS counter API under a steady load: `POST /api/v1/pos/scan` and `/checkout` from another process.

    .venv/bin/python -m bench.pos_bench                        # 300 requests/s for 60 s (~100 s in all)
    .venv/bin/python -m bench.pos_bench --rate 150 --seconds 30
    .venv/bin/python -m bench.pos_bench --py-spy /tmp/pos-spy   # also sample the server with py-spy
    .venv/bin/python -m bench.pos_bench --server-command "env PYTHONPATH=/tmp/scratch .venv/bin/storepulse serve"

Everything runs on this machine and is torn down at the end, also on failure, Ctrl-C or SIGTERM:
a scratch TimescaleDB database (migrated) with the demo chain (seeds/demo_chain/*.csv through
`ingest.masterdata.import_file`), the flow and prompt definitions (seeds/config), a week of
simulated history, consultations at every stage and answered prompts for the bench's own
receipts, and one device token per till. The real server runs as `storepulse serve` (one
uvicorn worker, the default deployment) in its own process.

The load generator is another process: asyncio with a small HTTP/1.1 keep-alive client of its
own (32 connections, ~0.2 ms of CPU per request; `--client httpx` uses `httpx.AsyncClient`,
which needs ~1.5 ms per request and would take CPU from the server on a 2-core machine). It
runs an open-loop schedule: request ``i`` is due at ``t0 + i / rate`` whatever happened to the
earlier ones, waits for a free connection if all are busy, and its latency runs from the due
time to the end of the response, so a slow server cannot hide queueing (no coordinated
omission). Scans and checkouts are mixed 2:1 over pre-built bodies: plain SKUs,
flow-controlled SKUs without or with a consultation at each stage, 参松养心胶囊 on a receipt
whose prompt is still open or already answered, and baskets that check out or are held (409,
an expected answer). Every request's expected status is known beforehand, and every body
template is sent once and its answer checked (flow steps missing, prompts shown) before the run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import csv
import importlib
import math
import multiprocessing
import os
import random
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
from sqlalchemy import Engine, select, text
from sqlalchemy.engine import make_url

from bench.common import (
    ROOT,
    exit_cleanly_on_sigterm,
    free_port,
    machine_facts,
    percentile,
    print_facts,
    print_table,
    py_spy_recording,
)
from ingest.db import get_engine, session_scope
from ingest.models import Sku, Store
from ingest.service import ingest_payloads
from ingest.tokens import create_token
from seeds.demo import import_demo_chain
from seeds.simulator import load_chain, load_history
from store_rules.definitions import (
    FlowDefinition,
    active_flow,
    active_prompts,
    flow_controlled_skus,
    load_config_dir,
)
from store_rules.promotions import service as promotions
from store_rules.promotions.templates import load_templates_dir, stored_template

# The test fixtures are reused as they are (imported dynamically, as in bench.common).
_conftest: Any = importlib.import_module("tests.conftest")

P99_TARGET_MS = 25.0
LATE_LIMIT_MS = 5.0  # the run counts only if the generator queued 99 % of its requests at most this late
SCAN_PATH = "/api/v1/pos/scan"
CHECKOUT_PATH = "/api/v1/pos/checkout"
CONSULTATIONS_PER_STAGE = 8  # per store and stage (0..5 steps recorded)
ANSWERED_RECEIPTS = 20  # per store: receipts whose 参松养心胶囊 prompt is already answered
VARIANTS_PER_KIND = 240  # pre-built bodies per request kind, spread over the stores and tills

# Request kinds with their share within the endpoint.
SCAN_KINDS: dict[str, float] = {
    "scan: plain SKU": 40,
    "scan: flow SKU, no consultation": 8,
    "scan: flow SKU, consultation in progress": 22,
    "scan: flow SKU, consultation complete": 10,
    "scan: 参松养心胶囊, prompt open": 10,
    "scan: 参松养心胶囊, already answered": 10,
}
CHECKOUT_KINDS: dict[str, float] = {
    "checkout: plain basket": 40,
    "checkout: flow basket, consultation complete": 35,
    "checkout: flow basket, steps missing (409)": 15,
    "checkout: flow basket, no consultation (409)": 10,
}


# --- the scratch database and what it holds --------------------------------------------------------


@contextmanager
def scratch_database() -> Iterator[str]:
    """A migrated TimescaleDB database, dropped on the way out, even on failure."""
    try:
        url = str(_conftest.create_timescale_database("storepulse_bench"))
    except _conftest.pytest.skip.Exception as exc:  # the fixture "skips" when PostgreSQL/TimescaleDB is missing
        raise SystemExit(f"cannot benchmark: {exc}") from None
    try:
        yield url
    finally:
        _conftest.drop_database(url)


@dataclass(frozen=True)
class Template:
    """One ready-made request and what the server must answer."""

    kind: str
    endpoint: str  # "scan" or "checkout"
    path: str
    body: bytes
    token: str
    status: int  # 200, or 409 for a held checkout
    missing: tuple[str, ...] | None = None  # scan: flow steps still missing (None: not flow-controlled)
    prompts: int = 0  # scan: prompts the till must show


@dataclass
class Catalogue:
    plain: list[str]
    controlled: list[str]  # flow-controlled, no prompt
    prompting: list[str]  # prompt-triggering (参松养心胶囊), also flow-controlled in the demo chain
    prompt_ids: list[str]
    flow: FlowDefinition


@dataclass
class StoreFixture:
    store_id: str
    tills: list[tuple[str, str]]  # (terminal_id, token)
    consultations: dict[int, list[str]] = field(default_factory=dict)  # stage -> ids
    missing: dict[str, tuple[str, ...]] = field(default_factory=dict)  # consultation id -> steps missing
    answered: list[str] = field(default_factory=list)  # receipt ids with the prompt answered


def catalogue(engine: Engine) -> Catalogue:
    with session_scope(engine) as session:
        flow = active_flow(session=session)
        prompts = active_prompts(session=session).prompts
        controlled = flow_controlled_skus(session=session, flow=flow)
        skus = list(session.scalars(select(Sku).order_by(Sku.sku)))
        prompting = [s.sku for s in skus if any(p.trigger.matches(s, s.sku) for p in prompts)]
    result = Catalogue(
        plain=[s.sku for s in skus if s.sku not in controlled and s.sku not in prompting],
        controlled=[s.sku for s in skus if s.sku in controlled and s.sku not in prompting],
        prompting=prompting,
        prompt_ids=[p.id for p in prompts],
        flow=flow,
    )
    if not (result.plain and result.controlled and result.prompting):
        raise RuntimeError(f"the demo chain lacks plain, flow-controlled or prompting SKUs: {result}")
    if not all(s in controlled for s in prompting):
        raise RuntimeError("参松养心胶囊 is expected to be flow-controlled as well")
    return result


def step_event(
    store_id: str,
    terminal: str,
    consultation_id: str,
    step: str,
    n: int,
    at: datetime,
    rng: random.Random,
    cat: Catalogue,
) -> dict[str, Any]:
    """A valid step: done with the data the flow asks for, or (one in five) skipped with a listed reason."""
    skipped = rng.random() < 0.2
    data: dict[str, dict[str, Any]] = {
        "consultation": {"text": "询问病史及过敏史"},
        "symptoms": {"text": "胸闷、心悸，持续约三天", "keywords": ["胸闷", "心悸"]},
        "recommendation": {"skus": [rng.choice(cat.controlled)]},
        "insurance_check": {"result": rng.choice(["pass", "pass", "pass", "fail"])},
        "guidance": {"text": "每日3次，每次4粒，饭后温水送服"},
    }
    return {
        "type": "consultation_step",
        "event_id": f"{consultation_id}-{n}",
        "store_id": store_id,
        "terminal_id": terminal,
        "consultation_id": consultation_id,
        "occurred_at": at.isoformat(),
        "staff_id": None,
        "customer": None,
        "step": step,
        "status": "skipped" if skipped else "done",
        "skip_reason": rng.choice(cat.flow.skip_reasons).id if skipped else None,
        "data": None if skipped else data[step],
    }


def prepare(engine: Engine, days: int, seed: int) -> tuple[list[StoreFixture], Catalogue, dict[str, int]]:
    """Demo chain, definitions, history, the bench's consultations and prompt answers, one token per till."""
    counts: dict[str, int] = {}
    started = time.perf_counter()
    import_demo_chain(engine)
    with session_scope(engine) as session:
        load_config_dir(session=session)
    chain = load_chain()
    history = load_history(engine, chain, days=days)
    if history.rejected:
        raise RuntimeError(f"history: {history.rejected} events rejected: {history.errors[:3]}")
    counts["history events"] = history.events
    cat = catalogue(engine)
    rng = random.Random(seed)
    now = datetime.now(UTC)
    stores: list[StoreFixture] = []
    events: list[dict[str, Any]] = []
    with session_scope(engine) as session:
        for store in chain.stores:
            tills = [
                (t, create_token(session=session, store_id=store.store_id, name=f"bench-{store.store_id}-{t}").token)
                for t in store.terminals
            ]
            fixture = StoreFixture(store.store_id, tills)
            n = 0
            for stage in range(len(cat.flow.required_steps) + 1):
                ids = fixture.consultations.setdefault(stage, [])
                for _ in range(CONSULTATIONS_PER_STAGE):
                    n += 1
                    cid = f"BENCH-{store.store_id}-C{n:04d}"
                    ids.append(cid)
                    fixture.missing[cid] = tuple(cat.flow.required_steps[stage:])
                    terminal = rng.choice(store.terminals)
                    at = now - timedelta(minutes=rng.uniform(5, 60))
                    for number, step in enumerate(cat.flow.required_steps[:stage], start=1):
                        at += timedelta(seconds=rng.uniform(15, 40))
                        events.append(step_event(store.store_id, terminal, cid, step, number, at, rng, cat))
                    if stage >= 2 and rng.random() < 0.15:  # a corrected symptoms step: both records are kept
                        at += timedelta(seconds=5)
                        events.append(step_event(store.store_id, terminal, cid, "symptoms", 9, at, rng, cat))
            for r in range(ANSWERED_RECEIPTS):
                receipt_id = f"BENCH-{store.store_id}-A{r:04d}"
                fixture.answered.append(receipt_id)
                for sku in cat.prompting:
                    events.extend(
                        {
                            "type": "prompt_answer",
                            "event_id": f"{receipt_id}-{sku}",
                            "store_id": store.store_id,
                            "terminal_id": rng.choice(store.terminals),
                            "receipt_id": receipt_id,
                            "sku": sku,
                            "prompt_id": prompt_id,
                            "answer": rng.choice(["doctor", "referral", "poster"]),
                            "occurred_at": (now - timedelta(minutes=rng.uniform(1, 30))).isoformat(),
                            "staff_id": None,
                        }
                        for prompt_id in cat.prompt_ids
                    )
            stores.append(fixture)
        results = ingest_payloads(events, session=session, source="pos-bench")
    rejected = [r for r in results if r.status != "accepted"]
    if rejected:
        raise RuntimeError(f"bench fixtures: {len(rejected)} events not accepted, e.g. {rejected[:3]}")
    counts["bench events"] = len(events)
    counts["active promotions"] = approve_promotions(engine, [s.store_id for s in stores], cat)
    with engine.connect() as conn:
        for table in ("receipts", "receipt_lines", "consultation_steps", "prompt_answers", "device_tokens"):
            counts[table] = int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
    counts["seconds"] = round(time.perf_counter() - started)
    return stores, cat, counts


def promoted_skus(cat: Catalogue) -> set[str]:
    return {cat.plain[0], cat.controlled[0], cat.prompting[0]}


def approve_promotions(engine: Engine, store_ids: list[str], cat: Catalogue) -> int:
    """An active promotion per store on one plain, one flow and one prompting SKU, so scans carry some."""
    now = datetime.now(UTC)
    approved = 0
    with session_scope(engine) as session:
        load_templates_dir(session=session)
        template = stored_template(session=session, template_id="amount_off")
        assert template is not None
        for store_id in store_ids:
            store = session.get(Store, store_id)
            assert store is not None
            for sku in sorted(promoted_skus(cat)):
                draft = promotions.draft(session=session, store=store, sku=sku, template=template, evidence={}, now=now)
                assert draft is not None
                promotions.approve(session=session, promotion_id=draft.promotion_id, user_id="bench", now=now)
                approved += 1
    return approved


# --- request templates ---------------------------------------------------------------------------


def build_templates(stores: list[StoreFixture], cat: Catalogue, seed: int) -> list[Template]:
    rng = random.Random(seed + 1)
    steps = tuple(cat.flow.required_steps)
    last = len(steps)
    templates: list[Template] = []

    def body(**fields: Any) -> bytes:
        return orjson.dumps(fields)

    for kind in [*SCAN_KINDS, *CHECKOUT_KINDS]:
        for v in range(VARIANTS_PER_KIND):
            store = stores[v % len(stores)]
            terminal, token = rng.choice(store.tills)
            receipt_id = f"BENCH-{store.store_id}-{terminal}-{v:05d}"
            base: dict[str, Any] = {"store_id": store.store_id, "terminal_id": terminal, "receipt_id": receipt_id}
            if kind.startswith("scan"):
                consultation: str | None = None
                missing: tuple[str, ...] | None = None
                prompts = 0
                if kind == "scan: plain SKU":
                    sku = rng.choice(cat.plain)
                elif kind == "scan: flow SKU, no consultation":
                    sku, missing = rng.choice(cat.controlled), steps
                elif kind in ("scan: flow SKU, consultation in progress", "scan: flow SKU, consultation complete"):
                    stage = last if kind.endswith("complete") else rng.randrange(last)
                    sku = rng.choice(cat.controlled)
                    consultation = rng.choice(store.consultations[stage])
                    missing = store.missing[consultation]
                else:  # 参松养心胶囊: the prompt is shown unless answered on this receipt; it is flow-controlled too
                    sku = rng.choice(cat.prompting)
                    consultation = rng.choice(store.consultations[rng.randrange(last + 1)])
                    missing = store.missing[consultation]
                    if kind.endswith("already answered"):
                        base["receipt_id"] = rng.choice(store.answered)
                    else:
                        prompts = 1
                payload = {**base, "sku": sku, "kind": "sale"}
                if consultation:
                    payload["consultation_id"] = consultation
                templates.append(
                    Template(kind, "scan", SCAN_PATH, body(**payload), token, 200, missing=missing, prompts=prompts)
                )
                continue
            skus = rng.sample(cat.plain, rng.randint(1, 4))
            consultation = None
            status = 200
            if kind != "checkout: plain basket":
                flow_skus = rng.sample(cat.controlled + cat.prompting, rng.randint(1, 2))
                skus = [*flow_skus, *skus[: rng.randint(0, 3)]]
                rng.shuffle(skus)
                if kind.endswith("consultation complete"):
                    consultation = rng.choice(store.consultations[last])
                elif kind.endswith("steps missing (409)"):
                    consultation = rng.choice(store.consultations[rng.randrange(last)])
                    status = 409
                else:
                    status = 409
            payload = {**base, "skus": skus}
            if consultation:
                payload["consultation_id"] = consultation
            templates.append(Template(kind, "checkout", CHECKOUT_PATH, body(**payload), token, status))
    return templates


def check_templates(base_url: str, templates: list[Template], promoted: set[str]) -> None:
    """Send every template once, in turn, and compare status and content with what is expected."""
    problems: list[str] = []
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for t in templates:
            response = client.post(t.path, content=t.body, headers=headers_of(t.token))
            got = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
            problem = ""
            if response.status_code != t.status:
                problem = f"status {response.status_code}, expected {t.status}: {response.text[:300]}"
            elif t.endpoint == "scan":
                flow = got.get("flow")
                missing = tuple(flow["missing"]) if flow else None
                if missing != t.missing:
                    problem = f"flow missing {missing}, expected {t.missing}"
                elif len(got.get("prompts", [])) != t.prompts:
                    problem = f"{len(got.get('prompts', []))} prompts, expected {t.prompts}"
                elif len(got.get("promotions", [])) != (wanted := int(orjson.loads(t.body)["sku"] in promoted)):
                    problem = f"{len(got.get('promotions', []))} promotions, expected {wanted}"
            elif t.status == 409 and not got.get("missing"):
                problem = f"409 without missing steps: {got}"
            if problem:
                problems.append(f"{t.kind} {t.body.decode()}: {problem}")
    if problems:
        raise RuntimeError(
            f"{len(problems)} of {len(templates)} templates answered wrongly:\n  " + "\n  ".join(problems[:10])
        )


def headers_of(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", "content-type": "application/json"}


def schedule(templates: list[Template], total: int, mix: tuple[float, float], seed: int) -> list[int]:
    """Template index of each request: endpoint by the mix, then kind by its share, then a variant."""
    rng = random.Random(seed + 2)
    by_kind: dict[str, list[int]] = collections.defaultdict(list)
    for i, t in enumerate(templates):
        by_kind[t.kind].append(i)
    scan_kinds, scan_w = list(SCAN_KINDS), list(SCAN_KINDS.values())
    checkout_kinds, checkout_w = list(CHECKOUT_KINDS), list(CHECKOUT_KINDS.values())
    scan_share = mix[0] / (mix[0] + mix[1])
    order = []
    for _ in range(total):
        if rng.random() < scan_share:
            kind = rng.choices(scan_kinds, scan_w)[0]
        else:
            kind = rng.choices(checkout_kinds, checkout_w)[0]
        order.append(rng.choice(by_kind[kind]))
    return order


# --- the server (separate process) -------------------------------------------------------------------


@contextmanager
def server(
    url: str, port: int, log_path: Path, command: list[str] | None = None, extra_env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`storepulse serve` as deployed by default (one uvicorn worker), until it answers /healthz."""
    env = {**os.environ, "STOREPULSE_DATABASE_URL": url}
    env.pop("STOREPULSE_MQTT_URL", None)  # no broker unless the caller runs one: /healthz would say "degraded"
    env.update(extra_env or {})
    command = [*(command or [str(ROOT / ".venv" / "bin" / "storepulse"), "serve"]), "--host", "127.0.0.1"]
    command += ["--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the server exited ({process.returncode}):\n{tail(log_path)}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not answer /healthz within 30 s:\n{tail(log_path)}")
                time.sleep(0.1)
            yield process
        finally:
            stop_process(process, timeout=10)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop_process(process: subprocess.Popen[Any], timeout: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


# --- the load generator (separate process) -------------------------------------------------------------


@dataclass(frozen=True)
class LoadPlan:
    host: str
    port: int
    requests: list[tuple[str, bytes, str]]  # (path, body, token) per template
    order: list[int]  # template index of every request, in sending order
    rate: float
    connections: int
    timeout_s: float
    client: str = "raw"  # "raw" (asyncio streams, HTTP/1.1 keep-alive) or "httpx" (httpx.AsyncClient)


@dataclass(frozen=True)
class Outcome:
    """One request: its template, how late the generator queued it and its latency, both from its due time
    (seconds), and its status (0 = no response)."""

    template: int
    lag: float
    latency: float
    status: int
    error: str = ""


def generator_main(plan: LoadPlan, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the bench's to handle; it terminates us
    try:
        outcomes = asyncio.run(generate(plan, conn))
    except Exception as exc:
        conn.send(("failed", repr(exc)))
        raise
    conn.send(("done", outcomes))


def raw_request(host: str, port: int, path: str, body: bytes, token: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\nauthorization: Bearer {token}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class RawConnection:
    """One keep-alive HTTP/1.1 connection: send a ready-made request, read the status and the whole body."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def exchange(self, request: bytes) -> int:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, chunked, close = 0, False, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = b"close" in value.lower()
        if chunked:
            while size := int((await self.reader.readline()).split(b";")[0], 16):
                await self.reader.readexactly(size + 2)
            await self.reader.readline()
        elif length:
            await self.reader.readexactly(length)
        if close:
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def generate(plan: LoadPlan, conn: Connection) -> list[Outcome]:
    """Open loop: request i is queued at t0 + i/rate; `connections` senders take them in turn."""
    outcomes: list[Outcome | None] = [None] * len(plan.order)
    queue: asyncio.Queue[tuple[int, float, float] | None] = asyncio.Queue()
    async with contextlib.AsyncExitStack() as stack:
        if plan.client == "httpx":
            limits = httpx.Limits(max_connections=plan.connections, max_keepalive_connections=plan.connections)
            client = await stack.enter_async_context(
                httpx.AsyncClient(base_url=f"http://{plan.host}:{plan.port}", limits=limits, timeout=plan.timeout_s)
            )
            prepared: list[Any] = [(path, body, headers_of(token)) for path, body, token in plan.requests]
        else:
            prepared = [raw_request(plan.host, plan.port, *request) for request in plan.requests]

        async def sender() -> None:
            connection = RawConnection(plan.host, plan.port)
            try:
                while (item := await queue.get()) is not None:
                    i, due, queued = item
                    index = plan.order[i]
                    error = ""
                    try:
                        async with asyncio.timeout(plan.timeout_s):
                            if plan.client == "httpx":
                                path, body, headers = prepared[index]
                                status = (await client.post(path, content=body, headers=headers)).status_code
                            else:
                                status = await connection.exchange(prepared[index])
                    except (
                        OSError,
                        TimeoutError,
                        ValueError,
                        asyncio.IncompleteReadError,
                        asyncio.LimitOverrunError,
                        httpx.HTTPError,
                    ) as exc:
                        status, error = 0, type(exc).__name__
                        connection.close()
                    outcomes[i] = Outcome(index, queued - due, time.monotonic() - due, status, error)
            finally:
                connection.close()

        senders = [asyncio.create_task(sender()) for _ in range(plan.connections)]
        conn.send(("ready", os.getpid()))
        t0: float = conn.recv()
        for i in range(len(plan.order)):
            due = t0 + i / plan.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait((i, due, time.monotonic()))
        for _ in senders:
            queue.put_nowait(None)
        await asyncio.wait(senders, timeout=plan.timeout_s + 5)
    unanswered = Outcome(-1, float("nan"), float("inf"), 0, "NoAnswer")  # still queued or in flight at the end
    return [o or replace(unanswered, template=plan.order[i]) for i, o in enumerate(outcomes)]


@contextmanager
def load_generator(plan: LoadPlan) -> Iterator[tuple[BaseProcess, Connection, int]]:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=generator_main, args=(plan, theirs), daemon=True)
    process.start()
    try:
        deadline = time.monotonic() + 60
        while not ours.poll(0.5):
            if not process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the load generator did not get ready (exit code {process.exitcode})")
        kind, pid = ours.recv()
        if kind != "ready":
            raise RuntimeError(f"the load generator said {kind!r} instead of 'ready': {pid}")
        yield process, ours, pid
    finally:
        if process.is_alive():
            process.terminate()
        process.join(5)


# --- CPU accounting ------------------------------------------------------------------------------------


def cpu_of(process: psutil.Process, reaped_children: bool = False) -> float:
    """CPU seconds of a process (with its exited and waited-for children if asked), 0 if it is gone."""
    try:
        times = process.cpu_times()
    except psutil.Error:
        return 0.0
    total = times.user + times.system
    if reaped_children:
        total += times.children_user + times.children_system
    return total


def process_tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live children."""
    try:
        process = psutil.Process(pid)
        children = process.children(recursive=True)
    except psutil.Error:
        return 0.0
    return cpu_of(process) + sum(cpu_of(child) for child in children)


def postmaster(engine: Engine) -> psutil.Process | None:
    """The PostgreSQL server's main process: the parent of any backend, e.g. of our own connection."""
    with engine.connect() as conn:
        backend = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    try:
        return psutil.Process(backend).parent()
    except psutil.Error:
        return None


def postgres_cpu(main: psutil.Process | None, backend_pids: set[int]) -> tuple[float, dict[int, float]]:
    """CPU seconds ever used by the PostgreSQL cluster (live processes + the backends the postmaster has
    reaped, so short-lived connections are counted too), and the live backends of the bench database."""
    if main is None:
        return 0.0, {}
    total = cpu_of(main, reaped_children=True)
    backends: dict[int, float] = {}
    with contextlib.suppress(psutil.Error):
        for child in main.children():
            seconds = cpu_of(child)
            total += seconds
            if child.pid in backend_pids:
                backends[child.pid] = seconds
    return total, backends


@dataclass
class CpuSnapshot:
    at: float
    server: float
    generator: float
    postgres: float
    backends: dict[int, float]
    sessions: int
    machine: float
    steal: float


def snapshot(engine: Engine, main: psutil.Process | None, server_pid: int, generator_pid: int) -> CpuSnapshot:
    with engine.connect() as conn:
        backend_pids = {
            int(pid)
            for (pid,) in conn.execute(
                text("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
            )
        }
        sessions = conn.execute(
            text("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
        ).scalar_one()
    postgres, backends = postgres_cpu(main, backend_pids)
    machine = psutil.cpu_times()
    return CpuSnapshot(
        at=time.monotonic(),
        server=process_tree_cpu(server_pid),
        generator=process_tree_cpu(generator_pid),
        postgres=postgres,
        backends=backends,
        sessions=int(sessions),
        machine=machine.user + machine.system + machine.nice + machine.irq + machine.softirq,
        steal=getattr(machine, "steal", 0.0),
    )


# --- py-spy (optional) ------------------------------------------------------------------------------------


@contextmanager
def py_spy(pid: int, out: Path | None) -> Iterator[None]:
    """Sample the server with py-spy over the measured window and print where its Python time goes.

    `--gil` samples only the thread holding the GIL: with one worker process that is the resource the
    requests queue for (time in libpq or the kernel, with the GIL released, is not in the profile).
    py-spy stops the process for each sample, which costs some latency; compare with a run without it.
    """
    if out is None:
        yield
        return
    with py_spy_recording(
        pid,
        out / "server.txt",
        "\npy-spy, server, the thread holding the GIL",
        extra_args=("--rate", "100", "--gil"),
        top=25,
    ):
        yield


# --- the run -------------------------------------------------------------------------------------------


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)  # ms
    ok: int = 0
    expected_409: int = 0
    errors: int = 0
    error_kinds: collections.Counter[str] = field(default_factory=collections.Counter)

    def add(self, outcome: Outcome, expected: int) -> None:
        self.latencies.append(outcome.latency * 1000)
        if outcome.status == expected == 409:
            self.expected_409 += 1
        elif outcome.status == expected:
            self.ok += 1
        else:
            self.errors += 1
            self.error_kinds[outcome.error or f"HTTP {outcome.status} (expected {expected})"] += 1

    def p(self, q: float) -> float:
        return percentile(sorted(self.latencies), q)

    def row(self, label: str, seconds: float) -> list[Any]:
        values = sorted(self.latencies)
        return [
            label, f"{len(values):,}", f"{self.ok:,}", f"{self.expected_409:,}", f"{self.errors:,}",
            f"{percentile(values, 50):.1f}", f"{percentile(values, 90):.1f}", f"{percentile(values, 99):.1f}",
            f"{values[-1]:.1f}" if values else "-", f"{sum(1 for v in values if v != math.inf) / seconds:,.1f}",
        ]  # fmt: skip


def speed_probe() -> float:
    """Milliseconds for a fixed pure-Python loop: this VM's speed drifts by tens of percent over an hour, so
    runs are only comparable together with this figure."""
    started = time.perf_counter()
    total = 0
    for i in range(3_000_000):
        total += i
    return (time.perf_counter() - started) * 1000


def verdict(passed: bool) -> str:
    return "PASS" if passed else "MISS"


@dataclass
class Run:
    """What one load run left behind."""

    args: argparse.Namespace
    templates: list[Template]
    outcomes: list[Outcome]  # warm-up first
    warm: int  # requests in the warm-up
    before: CpuSnapshot
    after: CpuSnapshot
    started_utc: str  # wall-clock start of the measured window, to line up with server and PostgreSQL logs


def run(args: argparse.Namespace, stack: ExitStack) -> int:
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="storepulse-pos-bench-")))
    url = stack.enter_context(scratch_database())
    engine = get_engine(url)
    facts = machine_facts(engine)
    for irrelevant in ("mosquitto", "sqlite"):
        facts.pop(irrelevant, None)
    print_facts(facts)
    print(f"speed probe (3M-step Python loop) before the run: {speed_probe():.0f} ms", flush=True)
    stores, cat, counts = prepare(engine, args.days, args.seed)
    summary = ", ".join(f"{k} {v:,}" for k, v in counts.items() if k != "seconds")
    print(
        f"database {make_url(url).database}: demo chain ({len(stores)} stores), flow and prompt definitions, "
        f"{args.days} days of history + today; {summary} (prepared in {counts['seconds']} s)",
        flush=True,
    )
    templates = build_templates(stores, cat, args.seed)
    port = free_port()
    log_path = args.server_log or workdir / "server.log"
    command = args.server_command.split() if args.server_command else None
    server_process = stack.enter_context(server(url, port, log_path, command))
    check_templates(f"http://127.0.0.1:{port}", templates, promoted_skus(cat))
    print(
        f"server pid {server_process.pid} on 127.0.0.1:{port}; {len(templates):,} request templates checked", flush=True
    )

    warm = int(args.rate * args.warmup)
    plan = LoadPlan(
        host="127.0.0.1",
        port=port,
        requests=[(t.path, t.body, t.token) for t in templates],
        order=schedule(templates, int(args.rate * (args.warmup + args.seconds)), args.mix, args.seed),
        rate=args.rate,
        connections=args.connections,
        timeout_s=args.timeout,
        client=args.client,
    )
    generator, conn, generator_pid = stack.enter_context(load_generator(plan))
    main_pg = postmaster(engine)
    t0 = time.monotonic() + 0.5
    conn.send(t0)
    print(
        f"load: {args.rate:g} requests/s (scan:checkout {args.mix[0]:g}:{args.mix[1]:g}) from pid {generator_pid} "
        f"({args.client} client, {args.connections} keep-alive connections), {args.warmup:g} s warm-up, then "
        f"{args.seconds:g} s measured",
        flush=True,
    )
    time.sleep(max(0.0, t0 + args.warmup - time.monotonic()))
    before = snapshot(engine, main_pg, server_process.pid, generator_pid)
    started_utc = datetime.now(UTC).strftime("%H:%M:%S UTC")
    with py_spy(server_process.pid, args.py_spy):
        time.sleep(max(0.0, t0 + args.warmup + args.seconds - time.monotonic()))
        after = snapshot(engine, main_pg, server_process.pid, generator_pid)
    if not conn.poll(args.timeout + 30):
        raise RuntimeError("the load generator did not report within the timeout after the run")
    kind, payload = conn.recv()
    if kind != "done":
        raise RuntimeError(f"the load generator failed: {payload}")
    generator.join(5)
    if server_process.poll() is not None:
        raise RuntimeError(f"the server died during the run:\n{tail(log_path)}")
    outcomes: list[Outcome] = payload
    print(f"speed probe after the run: {speed_probe():.0f} ms")
    return report(Run(args, templates, outcomes, warm, before, after, started_utc))


def report(result: Run) -> int:
    args, templates = result.args, result.templates
    measured = result.outcomes[result.warm :]
    if args.save:
        save_outcomes(args.save, result.outcomes, result.warm, args.rate, templates)
    by_endpoint: dict[str, Tally] = collections.defaultdict(Tally)
    by_kind: dict[str, Tally] = collections.defaultdict(Tally)
    overall = Tally()
    for outcome in measured:
        t = templates[outcome.template]
        for tally in (by_endpoint[t.endpoint], by_kind[t.kind], overall):
            tally.add(outcome, t.status)
    headers = [
        "request",
        "count",
        "2xx",
        "409 expected",
        "errors",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "answered/s",
    ]
    rows = [
        by_endpoint[e].row(f"POST {p}", args.seconds) for e, p in (("scan", SCAN_PATH), ("checkout", CHECKOUT_PATH))
    ]
    rows.append(overall.row("both", args.seconds))
    print_table(
        f"latency from the scheduled send time: {args.seconds:g} s at {args.rate:g} requests/s, after "
        f"{args.warmup:g} s of warm-up",
        headers,
        rows,
    )
    kinds = [k for k in [*SCAN_KINDS, *CHECKOUT_KINDS] if k in by_kind]
    print_table("per request kind (for information)", headers, [by_kind[k].row(k, args.seconds) for k in kinds])
    errors: collections.Counter[str] = collections.Counter()
    for tally in by_endpoint.values():
        errors.update(tally.error_kinds)
    warm_errors = sum(1 for o in result.outcomes[: result.warm] if o.status != templates[o.template].status)
    if errors or warm_errors:
        print(f"errors: {dict(errors)}; errors during the warm-up: {warm_errors}")
    lags = sorted(o.lag * 1000 for o in measured if not math.isnan(o.lag))
    seconds: dict[int, list[float]] = collections.defaultdict(list)
    for i, o in enumerate(measured):
        seconds[int(i / args.rate)].append(o.latency * 1000)
    p99s = {second: percentile(sorted(values), 99) for second, values in seconds.items()}
    worst = max(p99s, key=lambda second: p99s[second])
    print(
        f"per second of the window: p99 over {P99_TARGET_MS:g} ms in {sum(v >= P99_TARGET_MS for v in p99s.values())} "
        f"of {len(p99s)} seconds; worst second +{worst} s (p99 {p99s[worst]:.1f} ms); median of the per-second "
        f"p99s {percentile(sorted(p99s.values()), 50):.1f} ms; window started {result.started_utc}"
    )
    print(
        f"generator: requests queued p50 {percentile(lags, 50):.2f} ms, p99 {percentile(lags, 99):.2f} ms, max "
        f"{lags[-1] if lags else float('nan'):.2f} ms after their due time (included in the latencies)"
    )

    before, after = result.before, result.after
    window = after.at - before.at
    n = len(measured)
    server_cpu = after.server - before.server
    postgres_cpu_s = after.postgres - before.postgres
    backends_cpu = sum(v - before.backends.get(pid, 0.0) for pid, v in after.backends.items())
    generator_cpu = after.generator - before.generator
    machine_cpu = after.machine - before.machine

    def cpu_row(label: str, seconds: float) -> list[str]:
        return [label, f"{100 * seconds / window:.0f}%", f"{1000 * seconds / n:.2f}"]

    print_table(
        f"CPU over the measured {window:.1f} s (100% = one core of {os.cpu_count()})",
        ["process", "CPU", "CPU ms per request"],
        [
            cpu_row("server (storepulse serve, one uvicorn worker)", server_cpu),
            cpu_row("PostgreSQL, whole cluster (incl. exited backends)", postgres_cpu_s),
            cpu_row(f"  of which the {len(after.backends)} open backends of the bench database", backends_cpu),
            cpu_row(f"load generator ({args.client} client)", generator_cpu),
            cpu_row("whole machine (anything else included)", machine_cpu),
            cpu_row("stolen by the hypervisor", after.steal - before.steal),
        ],
    )
    print(f"new PostgreSQL sessions on the bench database during the window: {after.sessions - before.sessions}")

    late = percentile(lags, 99)
    scan, checkout = by_endpoint["scan"], by_endpoint["checkout"]
    checks = [
        [f"POST /pos/scan p99 < {P99_TARGET_MS:g} ms", f"{scan.p(99):.1f} ms", verdict(scan.p(99) < P99_TARGET_MS)],
        [f"POST /pos/checkout p99 < {P99_TARGET_MS:g} ms", f"{checkout.p(99):.1f} ms",
         verdict(checkout.p(99) < P99_TARGET_MS)],
        [f"both together p99 < {P99_TARGET_MS:g} ms", f"{overall.p(99):.1f} ms",
         verdict(overall.p(99) < P99_TARGET_MS)],
        ["no errors (non-2xx other than an expected 409)", f"{overall.errors:,}", verdict(overall.errors == 0)],
        [f"generator on schedule at {args.rate:g}/s (p99 lateness < {LATE_LIMIT_MS:g} ms)", f"{late:.2f} ms",
         verdict(late < LATE_LIMIT_MS)],
    ]  # fmt: skip
    print_table("acceptance", ["target", "measured", "verdict"], checks)
    print(
        f"summary: p50 {overall.p(50):.1f} ms, p99 {overall.p(99):.1f} ms (scan {scan.p(50):.1f}/{scan.p(99):.1f}, "
        f"checkout {checkout.p(50):.1f}/{checkout.p(99):.1f}); server CPU {100 * server_cpu / window:.0f}% of one "
        f"core, PostgreSQL {100 * postgres_cpu_s / window:.0f}%"
    )
    return 0 if all(row[2] == "PASS" for row in checks) else 1


def save_outcomes(path: Path, outcomes: list[Outcome], warm: int, rate: float, templates: list[Template]) -> None:
    """One line per measured request, in sending order: due time (s from the start of the window), latency,
    generator lateness, status, kind."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(["due_s", "latency_ms", "late_ms", "status", "error", "kind"])
        for i, o in enumerate(outcomes[warm:]):
            out.writerow(
                [f"{i / rate:.4f}", f"{o.latency * 1000:.3f}", f"{o.lag * 1000:.3f}", o.status, o.error,
                 templates[o.template].kind]
            )  # fmt: skip
    print(f"saved {len(outcomes) - warm:,} requests to {path}")


def mix_of(value: str) -> tuple[float, float]:
    scan, _, checkout = value.partition(":")
    try:
        parsed = float(scan), float(checkout)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SCAN:CHECKOUT such as 2:1, got {value!r}") from None
    if min(parsed) < 0 or sum(parsed) <= 0:
        raise argparse.ArgumentTypeError(f"expected two non-negative shares, got {value!r}")
    return parsed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=300, help="requests/s, scans and checkouts together")
    parser.add_argument("--seconds", type=float, default=60, help="measured duration")
    parser.add_argument("--warmup", type=float, default=5, help="seconds at the same rate before measuring")
    parser.add_argument("--mix", type=mix_of, default=(2.0, 1.0), metavar="SCAN:CHECKOUT", help="default 2:1")
    parser.add_argument("--days", type=int, default=7, help="complete days of simulated history before today")
    parser.add_argument("--connections", type=int, default=32, help="the generator's keep-alive connections")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw", help="the generator's HTTP client")
    parser.add_argument("--timeout", type=float, default=10, help="per-request timeout (s); a timeout is an error")
    parser.add_argument("--seed", type=int, default=20261122)
    parser.add_argument("--py-spy", type=Path, metavar="DIR", help="sample the server with py-spy into DIR")
    parser.add_argument("--server-log", type=Path, metavar="FILE", help="keep the server's output in FILE")
    parser.add_argument("--save", type=Path, metavar="CSV", help="write every measured request to CSV (due s, ms, …)")
    parser.add_argument(
        "--server-command",
        help='run this instead of "storepulse serve" (same environment; --host and --port are appended)',
    )
    args = parser.parse_args(argv)
    exit_cleanly_on_sigterm()
    with ExitStack() as stack:
        return run(args, stack)


if __name__ == "__main__":
    raise SystemExit(main())
