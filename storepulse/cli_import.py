"""`storepulse import poslog | sales | db | watch`: what tills produce, into StorePulse.

Each command converts its input with a source adapter, prints the report (counts, what was left
out with where and why, reconciliation findings, rejected events) and stores the events through
the ingest service, or sends them to a remote StorePulse with `--to URL` (HTTP with a device
token, or MQTT). Exit code 0: everything accepted or a duplicate; 1: something was rejected or
failed; 2: the command was used wrongly (unknown profile, adapter or file).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from ingest.db import get_engine
from ingest.settings import get_settings

import_app = typer.Typer(
    help="Import what tills produce: POSLog files, sales exports, a POS database, a drop folder.",
    no_args_is_help=True,
)

StoreMap = Annotated[
    Path | None,
    typer.Option("--store-map", exists=True, dir_okay=False, help="CSV external_id,store_id (or kind,external_id,"
                 "target_id) or YAML: source ids onto StorePulse ids, over the source_mappings master data"),
]  # fmt: skip
DryRun = Annotated[bool, typer.Option("--dry-run", help="convert and report only: nothing is stored or sent")]
To = Annotated[
    str | None,
    typer.Option("--to", help="send to a remote StorePulse instead: http(s)://host:port or mqtt://STORE@host:1883"),
]
Token = Annotated[
    str | None,
    typer.Option("--token", envvar="STOREPULSE_IMPORT_TOKEN", help="device token (HTTP) or broker password (MQTT)"),
]
ReportJson = Annotated[Path | None, typer.Option("--report-json", help="also write the reports to this JSON file")]


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _engine() -> Engine:
    return get_engine(get_settings().effective_database_url)


def _destination(
    to: str | None, token: str | None, source: str, dry_run: bool, engine: Engine, chunk_size: int | None = None
) -> Any:
    from adapters.sources.importer import ImportFailed, destination_for

    if dry_run:
        return None
    settings = get_settings()
    try:
        return destination_for(
            to,
            token=token,
            engine=None if to else engine,
            source=source,
            topic_prefix=settings.mqtt_topic_prefix,
            **({"chunk_size": chunk_size} if chunk_size else {}),
        )
    except ImportFailed as exc:
        _fail(str(exc))


def _context(source: str, store_map: Path | None, engine: Engine) -> Any:
    from adapters.sources.importer import MappingFileError, context_from_database

    try:
        return context_from_database(engine, source=source, store_map=store_map, default_zone=get_settings().timezone)
    except MappingFileError as exc:
        _fail(str(exc))


@contextmanager
def _progress(total: int, label: str) -> Iterator[Callable[[int, Counter[str]], None]]:
    """A progress bar with the counts so far, on a terminal only (quiet in logs and pipes)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, disable=not console.is_terminal or total < 1, transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task(label, total=total)

        def advance(done: int, counts: Counter[str]) -> None:
            summary = " ".join(f"{k} {counts[k]}" for k in ("accepted", "duplicate", "rejected", "sent") if counts[k])
            bar.update(task, advance=done, description=f"{label} {summary}")

        yield advance


def _echo_outcome(outcome: Any) -> None:
    from adapters.sources.importer import report_lines

    for line in report_lines(outcome):
        typer.echo(line)


def _write_reports(path: Path | None, outcomes: Sequence[Any]) -> None:
    if path is not None:
        body = [o.as_dict() for o in outcomes]
        path.write_text(json.dumps(body, ensure_ascii=False, indent=2, default=str), encoding="utf-8")


def _import_files(
    adapter_name: str,
    adapter: Any,
    paths: list[Path],
    *,
    store_map: Path | None,
    dry_run: bool,
    to: str | None,
    token: str | None,
    report_json: Path | None = None,
) -> None:
    from adapters.sources.base import ImportReport
    from adapters.sources.importer import ImportOutcome, deliver

    engine = _engine()  # one pool for the mappings and every file's delivery
    context = _context(getattr(adapter, "source_name", adapter_name.split(":")[0]), store_map, engine)
    outcomes: list[ImportOutcome] = []
    for path in paths:
        try:
            conversion = adapter.convert(path, context=context)
        except Exception as exc:  # the adapter refused this file (--strict) or could not read it; go on
            report = getattr(exc, "report", None)
            if not isinstance(report, ImportReport):
                report = ImportReport(adapter_name, str(path))
            outcome = ImportOutcome(report, error=f"file not imported: {exc}", dry_run=dry_run)
        else:
            conversion.report.file = conversion.report.file or str(path)
            destination = _destination(to, token, f"import:{adapter_name}:{path.name}"[:200], dry_run, engine)
            with _progress(len(conversion.events), path.name) as advance:
                try:
                    outcome = deliver(conversion, destination, progress=advance)
                except SQLAlchemyError as exc:
                    outcome = ImportOutcome(conversion.report, error=f"database: {exc}")
        outcomes.append(outcome)
        _echo_outcome(outcome)
    _write_reports(report_json, outcomes)
    _summary_and_exit(outcomes)


def _summary_and_exit(outcomes: Sequence[Any]) -> None:
    total: Counter[str] = Counter()
    for outcome in outcomes:
        total.update(outcome.delivery)
    failed = [o for o in outcomes if o.failed]
    typer.echo(
        f"{len(outcomes)} file(s): events accepted {total['accepted']}, duplicate {total['duplicate']}, "
        f"rejected {total['rejected']}"
        + (f", sent {total['sent']}" if total["sent"] else "")
        + (f"; {len(failed)} file(s) with rejected events or errors" if failed else "")
    )
    if failed:
        raise typer.Exit(1)


def _adapter(name: str, **options: Any) -> Any:
    from adapters.sources.importer import adapter_named

    try:
        return adapter_named(name, **options)
    except LookupError as exc:
        _fail(str(exc))
    except (TypeError, ValueError) as exc:  # e.g. an unknown sales profile
        _fail(f"{name}: {exc}")


@import_app.command("poslog")
def import_poslog(
    paths: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, readable=True, help="POSLog XML files")],
    store_map: StoreMap = None,
    dry_run: DryRun = False,
    to: To = None,
    token: Token = None,
    report_json: ReportJson = None,
) -> None:
    """ARTS POSLog files (NCR, Retalix/Oracle, Visma, roqqio dialects)."""
    _import_files("poslog", _adapter("poslog"), paths, store_map=store_map, dry_run=dry_run, to=to, token=token,
                  report_json=report_json)  # fmt: skip


@import_app.command("sales")
def import_sales(
    paths: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, readable=True, help="CSV or XLSX")],
    profile: Annotated[str, typer.Option("--profile", help="mapping profile, e.g. chaoyang_pharmacy")],
    strict: Annotated[bool, typer.Option("--strict", help="refuse a whole file when any row is refused")] = False,
    store_map: StoreMap = None,
    dry_run: DryRun = False,
    to: To = None,
    token: Token = None,
    report_json: ReportJson = None,
) -> None:
    """Spreadsheet and CSV sales exports (海典, 英克, 科脉 ...), read through a mapping profile."""
    _import_files(f"sales:{profile}", _adapter("sales", profile=profile, strict=strict), paths, store_map=store_map,
                  dry_run=dry_run, to=to, token=token, report_json=report_json)  # fmt: skip


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        typer.echo(f"{signal.Signals(signum).name}: stopping after the current step", err=True)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


@import_app.command("db")
def import_db(
    profile: Annotated[str, typer.Option("--profile", help="seeds/import_profiles/NAME.db.yaml, or a path")],
    once: Annotated[
        bool, typer.Option("--once", help="pull once and exit (else every interval until SIGTERM)")
    ] = False,
    interval: Annotated[float | None, typer.Option("--interval", min=0.1, help="seconds between pulls")] = None,
    store_map: StoreMap = None,
    dry_run: DryRun = False,
    to: To = None,
    token: Token = None,
) -> None:
    """Pull a POS database incrementally (思迅 t_rm_saleflow and the like); the watermark is kept in the database."""
    from adapters.sources.db_pull import ProfileError, PullResult, counts_summary, load_profile, pull_loop, pull_once

    try:
        spec = load_profile(profile)
        spec.resolved_url()
    except ProfileError as exc:
        _fail(str(exc))
        raise
    store = _engine()
    destination = _destination(to, token, spec.source_name, dry_run, store, chunk_size=spec.batch_size)

    def show(result: PullResult) -> None:
        _echo_outcome(result.outcome)
        typer.echo(f"{spec.name}: {counts_summary(result)}")

    try:
        if once:
            context = _context(spec.source_name, store_map, store)
            with _progress(0, spec.name) as advance:
                result = pull_once(spec, store=store, context=context, destination=destination, progress=advance)
            show(result)
            if result.outcome.failed:
                raise typer.Exit(1)
            return
        if destination is None:
            _fail("--dry-run needs --once (a dry run saves no watermark, so a loop would read the same rows again)")
        stop = _stop_on_signals()
        status = pull_loop(spec, store=store, context_for=lambda: _context(spec.source_name, store_map, store),
                           destination=destination, stop=stop, on_pull=show, interval_s=interval)  # fmt: skip
    except ProfileError as exc:
        _fail(str(exc))
        raise
    except SQLAlchemyError as exc:
        _fail(f"database: {exc}", 1)
        raise
    typer.echo(f"{spec.name}: stopped")
    raise typer.Exit(status)


@import_app.command("watch")
def import_watch(
    directory: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="the drop folder")],
    adapter: Annotated[str, typer.Option("--adapter", help="poslog, or sales:PROFILE")],
    settle: Annotated[float, typer.Option("--settle", min=0, help="seconds a file's size and mtime must hold")] = 2.0,
    poll: Annotated[float, typer.Option("--poll", min=0.05, help="seconds between looks at the folder")] = 1.0,
    chunk_size: Annotated[int, typer.Option("--chunk-size", min=1, help="events per transaction (local)")] = 1000,
    store_map: StoreMap = None,
    dry_run: DryRun = False,
    to: To = None,
    token: Token = None,
) -> None:
    """Import files dropped into DIR once complete; move each to DIR/done/ or DIR/failed/ with its report."""
    from adapters.sources.drop_folder import DropFolder, FileResult

    store = _engine()
    destination = _destination(to, token, f"import:watch:{adapter}"[:200], dry_run, store, chunk_size=chunk_size)

    def show(result: FileResult) -> None:
        _echo_outcome(result.outcome)
        where = f" → {result.moved_to}" if result.moved_to else ""
        note = " (already imported: moved only)" if result.already_imported else ""
        typer.echo(f"{result.path.name}: {result.status}{where}{note}")
        sys.stdout.flush()

    try:
        folder = DropFolder(
            directory, adapter_spec=adapter, store=store, destination=destination,
            context_for=lambda source: _context(source, store_map, store),
            settle_s=settle, poll_s=poll, on_file=show,
        )  # fmt: skip
    except (LookupError, TypeError, ValueError) as exc:
        _fail(str(exc))
        raise
    stop = _stop_on_signals()
    try:
        folder.run(stop)
    except SQLAlchemyError as exc:
        _fail(f"database: {exc} (run `storepulse db upgrade` first)", 1)
    typer.echo(f"{directory}: stopped")
