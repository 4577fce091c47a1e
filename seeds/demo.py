"""`storepulse demo`: a fresh database, the demo chain, history, a live trickle and the app.

Everything goes through the real paths: Alembic migrations, the master-data importer, the
flow and prompt definitions of seeds/config/ loaded as versions, the ingest service (with
the compliance check) for history, and for the live trickle the public HTTP API with one
device token per store, exactly as a till would post. A few tills (`POS_TILLS`) ring their
sales up through the POS API instead: scans, prompts, the five steps, the checkout gate.
"""

from __future__ import annotations

import logging
import random
import secrets
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from sqlalchemy import Engine, delete, select
from sqlalchemy.engine import make_url

from ingest.db import get_engine, session_scope
from ingest.masterdata import IMPORT_ORDER, ImportReport, import_file
from ingest.migrate import upgrade
from ingest.models import RollupDirty, Store, User
from ingest.settings import get_settings
from ingest.tokens import create_token
from seeds.pos_till import PosError, PosTill
from seeds.simulator import DEMO_CHAIN_DIR, SEED, Chain, HistoryReport, LiveFeed, load_chain, load_history
from store_rules import rollups
from store_rules.definitions import CONFIG_DIR, load_config_dir

log = logging.getLogger(__name__)

LIVE_STORES = ("S001", "S002", "S005", "S009")  # one or two per region, S001 always
POS_TILLS = (("S001", "T1"), ("S005", "T1"))  # tills that sell through the POS API; the others post receipts
DEMO_MANAGER = "demo-manager"  # who approves the POS stores' promotion drafts in the demo (audited)
TOKEN_NAME = "demo-simulator"


class DemoError(RuntimeError):
    pass


class _Interrupted(BaseException):
    """Ctrl-C or SIGTERM before the server is up: stop preparing and leave cleanly."""


@dataclass
class PreparedDemo:
    url: str
    engine: Engine
    chain: Chain
    tokens: dict[str, str]  # store_id → device token, kept in memory for the live feed only
    history: HistoryReport
    imported: list[ImportReport]
    definitions: list[tuple[str, int, bool]]  # (kind, version, created) of the flow and prompt definitions
    logins: list[DemoLogin] = field(default_factory=list)


@dataclass(frozen=True)
class DemoLogin:
    """One person per role, to sign in to the demo's pages with."""

    user_id: str
    name: str
    role: str
    scope: str  # store, region or "chain"
    password: str


# Who signs in to the demo: one person per role, scoped to S001 / its region R-ZJ.
DEMO_PEOPLE = (
    ("staff-s001", "李娜", "staff", "S001", None),
    ("manager-s001", "王店长", "manager", "S001", None),
    ("supervisor-zj", "周督导", "supervisor", None, "R-ZJ"),
    ("hq", "总部运营", "headquarters", None, None),
    ("admin", "系统管理员", "admin", None, None),
)


def create_demo_users(engine: Engine) -> list[DemoLogin]:
    """The demo's people with fresh random passwords (printed once by the demo, never stored in clear)."""
    from ingest.users import create_user, set_password

    logins = []
    with session_scope(engine) as session:
        for user_id, name, role, store_id, region_id in DEMO_PEOPLE:
            if session.get(User, user_id) is None:
                create_user(
                    session=session, user_id=user_id, name=name, role=role, store_id=store_id, region_id=region_id
                )
            password = secrets.token_urlsafe(9)
            set_password(session=session, user_id=user_id, password=password, actor="demo")
            logins.append(DemoLogin(user_id, name, role, store_id or region_id or "chain", password))
    return logins


def default_database_url() -> str:
    return f"sqlite:///{(get_settings().var_dir / 'demo.db').as_posix()}"


def reset_sqlite(url: str) -> None:
    """Delete a SQLite database file (and its WAL files) so the demo starts from nothing."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return
    get_engine(url).dispose()
    path = Path(parsed.database)
    for candidate in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        candidate.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)


def import_demo_chain(engine: Engine, directory: Path = DEMO_CHAIN_DIR) -> list[ImportReport]:
    """Import the demo chain's CSVs in one transaction; any bad row aborts the whole import."""
    reports: list[ImportReport] = []
    with session_scope(engine) as session:
        for kind in IMPORT_ORDER:
            path = directory / f"{kind}.csv"
            if not path.exists():
                continue
            file_reports = import_file(path, session=session, kind=kind)
            errors = [f"{r.source} {error}" for r in file_reports for error in r.errors]
            if errors:
                raise DemoError("demo chain does not import cleanly:\n  " + "\n  ".join(errors[:20]))
            reports.extend(file_reports)
    return reports


def prepare(
    database_url: str | None = None,
    *,
    days: int = 30,
    now: datetime | None = None,
    fresh: bool = True,
    echo: Callable[[str], None] = print,
) -> PreparedDemo:
    """Migrate, import the demo chain and the definitions, load history up to ``now``, create device tokens."""
    url = database_url or default_database_url()
    if fresh:
        reset_sqlite(url)
    echo(f"database: {make_url(url).render_as_string(hide_password=True)}")
    upgrade(url)
    engine = get_engine(url)
    imported = import_demo_chain(engine)
    chain = load_chain()
    echo("demo chain: " + ", ".join(f"{r.rows} {r.kind}" for r in imported) + f" (from {DEMO_CHAIN_DIR})")
    with session_scope(engine) as session:
        definitions = load_config_dir(session=session)
    echo(
        "definitions: "
        + ", ".join(
            f"{kind} v{version}" + ("" if created else " (unchanged)") for kind, version, created in definitions
        )
        + f" (from {CONFIG_DIR})"
    )
    echo(f"simulating {days} days of history and today so far for {len(chain.stores)} stores ...")
    history = load_history(engine, chain, days=days, now=now)
    echo(
        f"history: {history.events:,} events ({history.accepted:,} accepted, {history.duplicate:,} duplicate, "
        f"{history.rejected:,} rejected) for {history.store_days} store-days in {history.seconds:.1f} s"
    )
    for error in history.errors:
        echo(f"  rejected: {error}")
    with session_scope(engine) as session:
        today = (now or datetime.now(UTC)).astimezone(get_settings().chain_tz).date()
        built = rollups.rebuild(session=session, first=today - timedelta(days=days), last=today - timedelta(days=1))
        session.execute(delete(RollupDirty).where(RollupDirty.day < today))
    echo(f"rollups: {built} store-days")
    alerts = replay_rules(engine, days=days, now=now)
    echo(f"rules: {alerts} alert(s) raised over the history (storepulse scheduler keeps evaluating)")
    pending, approved = approve_pos_stores_drafts(engine, now=now)
    echo(
        f"promotions: {pending} draft(s) from the stock and expiry rules wait for their store managers; "
        f"{approved} of {', '.join(sorted({s for s, _ in POS_TILLS}))} approved, so their POS tills ring them up"
    )
    tokens: dict[str, str] = {}
    with session_scope(engine) as session:
        for store in chain.stores:
            tokens[store.store_id] = create_token(session=session, store_id=store.store_id, name=TOKEN_NAME).token
    echo(f"device tokens: {len(tokens)} created (one per store, kept in memory for the live feed)")
    logins = create_demo_users(engine)
    echo("sign in at /login as (user / password, new for every run):")
    for person in logins:
        echo(f"  {person.user_id:<14} {person.password:<14} {person.role} of {person.scope} ({person.name})")
    return PreparedDemo(
        url=url,
        engine=engine,
        chain=chain,
        tokens=tokens,
        history=history,
        imported=imported,
        definitions=definitions,
        logins=logins,
    )


def replay_rules(engine: Engine, *, days: int, now: datetime | None = None) -> int:
    """Load the templates and rule files; evaluate the metric rules at the close of each history day.

    Stock rules run once, on today's stock, as the scheduler's next run would: drafts replayed
    over the history would only have expired undecided.
    """
    from store_rules.alerts.definitions import stored_rules
    from store_rules.alerts.rules import stock_rule_for
    from store_rules.alerts.service import MetricSource, evaluate_rule
    from store_rules.promotions.templates import load_templates_and_rules

    now = now or datetime.now(UTC)
    raised = 0
    with session_scope(engine) as session:
        load_templates_and_rules(session=session)
        for rule in stored_rules(session=session, enabled_only=True):
            if stock_rule_for(rule) is not None:
                raised += len(evaluate_rule(session=session, rule=rule, now=now).raised)
        stores = [s.store_id for s in session.scalars(select(Store))]
        today = now.astimezone(get_settings().chain_tz).date()
        first = today - timedelta(days=days)
        source = MetricSource(session)
        source.preload(stores, first - timedelta(days=31), today - timedelta(days=1))
        for offset in range(days):
            day = first + timedelta(days=offset)
            closing = datetime.combine(day + timedelta(days=1), time(1), get_settings().chain_tz)
            for rule in stored_rules(session=session, enabled_only=True):
                if stock_rule_for(rule) is not None:
                    continue
                report = evaluate_rule(session=session, rule=rule, day=day, now=min(closing, now), source=source)
                raised += len(report.raised)
    return raised


def approve_pos_stores_drafts(engine: Engine, *, now: datetime | None = None) -> tuple[int, int]:
    """Approve the drafts of the stores whose tills use the POS API, as their managers would.

    Their scans then return the promotions and the execution rate has sales to count.
    Returns (drafts still pending elsewhere, drafts approved).
    """
    from store_rules.promotions import service as promotions

    now = now or datetime.now(UTC)
    stores = sorted({store_id for store_id, _ in POS_TILLS})
    with session_scope(engine) as session:
        drafts = promotions.list_promotions(session=session, status="pending", limit=10_000)
        approved = 0
        for draft in drafts:
            if draft.store_id in stores:
                promotions.approve(session=session, promotion_id=draft.promotion_id, user_id=DEMO_MANAGER, now=now)
                approved += 1
    return len(drafts) - approved, approved


def pos_tills(
    base_url: str, chain: Chain, tokens: dict[str, str], start: datetime, tills: tuple[tuple[str, str], ...] = POS_TILLS
) -> dict[tuple[str, str], PosTill]:
    """A `PosTill` per (store, terminal) that exists and has a token, each with its own seeded random."""
    out: dict[tuple[str, str], PosTill] = {}
    for store_id, terminal_id in tills:
        if store_id not in tokens or terminal_id not in chain.store(store_id).terminals:
            continue
        rng = random.Random(f"{SEED}:pos:{store_id}:{terminal_id}:{start.isoformat()}")
        out[store_id, terminal_id] = PosTill(base_url, tokens[store_id], chain, store_id, terminal_id, rng=rng)
    return out


def post_live_events(
    client: httpx.Client,
    feed: LiveFeed,
    tokens: dict[str, str],
    now: datetime | None = None,
    tills: dict[tuple[str, str], PosTill] | None = None,
) -> dict[str, int]:
    """Post everything the feed has up to ``now`` through ``POST /api/v1/events``; counts per status.

    The sales the feed set aside for POS-driven tills are then rung up by those ``tills``
    (counted as `pos_sales`, and `pos_blocked` for checkouts refused first).
    """
    counts = {"accepted": 0, "duplicate": 0, "rejected": 0}
    for store_id, events in feed.events_until(now or datetime.now(UTC)).items():
        response = client.post(
            "/api/v1/events", json={"events": events}, headers={"Authorization": f"Bearer {tokens[store_id]}"}
        )
        response.raise_for_status()
        for result in response.json()["results"]:
            counts[result["status"]] = counts.get(result["status"], 0) + 1
            if result["status"] == "rejected":
                log.warning("live event %s rejected: %s", result["event_id"], result["error"])
    for pending in feed.take_pos_sales():
        till = (tills or {}).get((pending.store_id, pending.sale.terminal))
        if till is None:
            raise KeyError(f"no POS till {pending.store_id} {pending.sale.terminal} for the feed's pos_terminals")
        try:
            sold = till.sell(pending.sale, pending.consultation_id)
        except PosError as exc:
            log.warning("POS till %s %s: %s", pending.store_id, pending.sale.terminal, exc)
            continue
        counts[sold.receipt_status] = counts.get(sold.receipt_status, 0) + 1
        counts["pos_sales"] = counts.get("pos_sales", 0) + 1
        counts["pos_blocked"] = counts.get("pos_blocked", 0) + (sold.blocked is not None)
    return counts


def live_loop(
    base_url: str,
    feed: LiveFeed,
    tokens: dict[str, str],
    stop: threading.Event,
    *,
    interval_s: float = 1.0,
    tills: dict[tuple[str, str], PosTill] | None = None,
) -> None:
    """Post the live trickle once a second until ``stop`` is set; survives a failing request."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would drown the console
    try:
        with httpx.Client(base_url=base_url, timeout=10.0) as client:
            while not stop.wait(interval_s):
                try:
                    post_live_events(client, feed, tokens, tills=tills)
                except (httpx.HTTPError, KeyError, ValueError) as exc:
                    log.warning("live feed: %s", exc)
    finally:
        for till in (tills or {}).values():
            till.close()


def _display_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def run_demo(
    host: str = "127.0.0.1",
    port: int = 8000,
    days: int = 30,
    live: bool = True,
    database_url: str | None = None,
) -> None:
    """Prepare a fresh demo database and serve the app until Ctrl-C or SIGTERM."""
    import uvicorn

    from dashboard.app import create_app

    stop = threading.Event()
    server: uvicorn.Server | None = None

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # While uvicorn runs it has its own handlers (graceful shutdown); after shutdown it
        # re-raises the signal, which lands here and only confirms the stop.
        stop.set()
        if server is None:
            raise _Interrupted
        server.should_exit = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def say(text: str) -> None:
        print(text, flush=True)

    try:
        prepared = prepare(database_url, days=days, fresh=database_url is None, echo=say)
        settings = get_settings().model_copy(update={"database_url": prepared.url})
        app = create_app(settings, prepared.engine)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
        server = uvicorn.Server(config)
        url = f"http://{_display_host(host)}:{port}/"
        companion = threading.Thread(
            target=_companion, args=(server, url, prepared, live, stop, say), name="demo-live", daemon=True
        )
        companion.start()
        try:
            server.run()
        finally:
            stop.set()
            companion.join(timeout=15)
        if not server.started:
            raise DemoError(f"the server did not start on {host}:{port} (is the port in use?)")
        say("StorePulse demo stopped.")
    except _Interrupted:
        say("StorePulse demo interrupted.")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _companion(
    server: Any, url: str, prepared: PreparedDemo, live: bool, stop: threading.Event, say: Callable[[str], None]
) -> None:
    """Announce the URL once the server listens, then run the live trickle."""
    while not server.started:
        if stop.wait(0.05):
            return
    say(f"StorePulse demo: {url}")
    if not live:
        say("live feed off (--no-live); press Ctrl-C to stop")
        return
    stores = [s for s in LIVE_STORES if s in prepared.tokens] or sorted(prepared.tokens)[:4]
    start = datetime.now(UTC)
    base_url = url.rstrip("/")
    wanted = tuple((store_id, terminal_id) for store_id, terminal_id in POS_TILLS if store_id in stores)
    tills = pos_tills(base_url, prepared.chain, prepared.tokens, start, wanted)
    pos_terminals: dict[str, list[str]] = {}
    for store_id, terminal_id in tills:
        pos_terminals.setdefault(store_id, []).append(terminal_id)
    feed = LiveFeed(prepared.chain, stores, start=start, pos_terminals=pos_terminals)
    if tills:
        say(
            f"POS tills: {', '.join(f'{s} {t}' for s, t in tills)} ring their sales up through /api/v1/pos "
            "(scan, prompts, steps, checkout); checkouts refused first are logged"
        )
    say(f"live feed: stores {', '.join(stores)} post to /api/v1/events every second; press Ctrl-C to stop")
    live_loop(base_url, feed, prepared.tokens, stop, tills=tills)


def main() -> None:  # pragma: no cover - `python -m seeds.demo` for a quick try without the CLI
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_demo(days=int(sys.argv[1]) if len(sys.argv) > 1 else 30)


if __name__ == "__main__":  # pragma: no cover
    main()
