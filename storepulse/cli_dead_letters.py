"""`storepulse dead-letters list | show | replay`: see what ingest refused, and store it once the cause is fixed."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated
from zoneinfo import ZoneInfo

import typer

from ingest.db import get_engine, session_scope
from ingest.settings import get_settings

dead_letters_app = typer.Typer(
    help="Dead letters (payloads ingest refused, with the reason): list, show, replay.", no_args_is_help=True
)
# One transaction per chunk keeps a replay of many thousand letters from holding one huge transaction.
REPLAY_CHUNK = 200


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _local(moment: datetime | None, zone: ZoneInfo) -> str:
    return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S") if moment is not None else "—"


def _since(value: str | None, zone: ZoneInfo) -> datetime | None:
    from ingest.dead_letters import DeadLetterError, parse_since

    if value is None:
        return None
    try:
        return parse_since(value, zone)
    except DeadLetterError as exc:
        _fail(f"--{exc}")
        raise  # unreachable: _fail exits


def _state(replayed_at: datetime | None, replay_status: str | None) -> str:
    if replayed_at is not None:
        return f"replayed ({replay_status})"
    return "replay rejected" if replay_status == "rejected" else "not replayed"


@dead_letters_app.command("list")
def dead_letters_list(
    reason: Annotated[str | None, typer.Option("--reason", help="part of the reason, any case")] = None,
    source: Annotated[
        str | None, typer.Option("--source", help="part of the source (mqtt:<topic>, http:<device>)")
    ] = None,
    store: Annotated[str | None, typer.Option("--store", help="store_id copied from the payload")] = None,
    since: Annotated[str | None, typer.Option("--since", help="YYYY-MM-DD (chain time zone) or an ISO time")] = None,
    replayed: Annotated[
        bool | None, typer.Option("--replayed/--not-replayed", help="only replayed ones / only the others")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="at most this many, newest first")] = 100,
) -> None:
    """Dead letters, newest first, with the reason and whether they were replayed."""
    from ingest.dead_letters import count_dead_letters, list_dead_letters

    settings = get_settings()
    zone = settings.chain_tz
    moment = _since(since, zone)
    with session_scope(get_engine(settings.effective_database_url)) as session:
        letters = list_dead_letters(
            session=session, reason=reason, source=source, store_id=store, since=moment, replayed=replayed, limit=limit
        )
        total = count_dead_letters(
            session=session, reason=reason, source=source, store_id=store, since=moment, replayed=replayed
        )
    typer.echo(f"{total} dead letter(s) match; showing {len(letters)}, newest first. Times in {settings.timezone}.")
    if not letters:
        return
    rows = [
        [str(d.id), _local(d.received_at, zone), d.source, d.store_id or "", _state(d.replayed_at, d.replay_status),
         d.reason.splitlines()[0] if d.reason else ""]
        for d in letters
    ]  # fmt: skip
    columns = ["id", f"received ({settings.timezone})", "source", "store", "replay", "reason"]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns[:-1])]
    typer.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=False)) + "  reason")
    for row in rows:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)) + "  " + row[-1])


@dead_letters_app.command("show")
def dead_letters_show(letter_id: Annotated[int, typer.Argument(help="the dead letter's id")]) -> None:
    """One dead letter in full: reason, replay status and the raw payload exactly as received."""
    from ingest.dead_letters import get_dead_letter

    settings = get_settings()
    zone = settings.chain_tz
    with session_scope(get_engine(settings.effective_database_url)) as session:
        letter = get_dead_letter(session=session, letter_id=letter_id)
        if letter is None:
            _fail(f"id: no dead letter {letter_id}", 1)
            return
        fields = [
            ("id", str(letter.id)),
            (f"received ({settings.timezone})", _local(letter.received_at, zone)),
            ("source", letter.source),
            ("event_id", letter.event_id or "—"),
            ("store_id", letter.store_id or "—"),
            ("reason", letter.reason),
            ("replay", _state(letter.replayed_at, letter.replay_status)),
            (f"replayed at ({settings.timezone})", _local(letter.replayed_at, zone)),
            ("replay note", letter.replay_note or "—"),
        ]
        raw = letter.raw_payload
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        typer.echo(f"{name.ljust(width)}  {value}")
    typer.echo("raw payload:")
    typer.echo(raw)


@dead_letters_app.command("replay")
def dead_letters_replay(
    ids: Annotated[list[int] | None, typer.Option("--id", help="this dead letter (repeat for several)")] = None,
    reason: Annotated[
        str | None, typer.Option("--reason", help="every dead letter whose reason holds this text")
    ] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="every dead letter not replayed yet")] = False,
    source: Annotated[str | None, typer.Option("--source", help="narrow to sources holding this text")] = None,
    since: Annotated[str | None, typer.Option("--since", help="narrow to letters received since then")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate and report; write nothing")] = False,
) -> None:
    """Validate dead letters again against today's master data and store those that now pass.

    A stored letter is marked replayed (with the time) and kept; one refused again keeps the new
    reason and can be replayed later. Letters already replayed are skipped.
    """
    from ingest.dead_letters import ReplayReport, replay_candidates, replay_dead_letters

    chosen = sum([bool(ids), reason is not None, replay_all])
    if chosen != 1:
        _fail("choose exactly one of --id N, --reason TEXT or --all")
    settings = get_settings()
    zone = settings.chain_tz
    engine = get_engine(settings.effective_database_url)
    with session_scope(engine) as session:
        selected = replay_candidates(session=session, ids=ids, reason=reason, source=source, since=_since(since, zone))
    missing = sorted(set(ids or ()) - set(selected))
    report = ReplayReport(dry_run=dry_run)
    for start in range(0, len(selected), REPLAY_CHUNK):
        with session_scope(engine) as session:
            part = replay_dead_letters(
                session=session, ids=selected[start : start + REPLAY_CHUNK], dry_run=dry_run, actor="cli",
                topic_prefix=settings.mqtt_topic_prefix,
            )  # fmt: skip
        report.extend(part)
    would = "would be " if dry_run else ""
    for letter in report.letters:
        events = f"{letter.events} event(s)" if letter.events else ""
        typer.echo(
            f"#{letter.letter_id:<7} {would}{letter.outcome:<9} {events:<12} {letter.source}"
            + (f"  — {letter.note}" if letter.note else "")
        )
    counts = report.counts
    typer.echo(
        f"{'dry run, nothing written: ' if dry_run else ''}{len(report.letters)} dead letter(s): "
        f"{counts['accepted']} accepted, {counts['duplicate']} duplicate (already stored), "
        f"{counts['rejected']} rejected again, {counts['skipped']} skipped (already replayed)"
    )
    if missing:
        _fail(f"id: no dead letter {', '.join(map(str, missing))}", 1)
