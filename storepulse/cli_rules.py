"""`storepulse rules ...`, `storepulse scheduler`, `storepulse users ...`, `storepulse alerts ...`."""

from __future__ import annotations

import csv
import signal
import sys
from datetime import date
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from ingest.db import get_engine, session_scope
from ingest.settings import get_settings

rules_app = typer.Typer(help="Alert rules: load, list, versions, evaluate, back-test.", no_args_is_help=True)
users_app = typer.Typer(help="People: create, list, disable (each gets a personal API token).", no_args_is_help=True)
alerts_app = typer.Typer(help="Alerts: list, acknowledge, resolve, deliver.", no_args_is_help=True)
rollups_app = typer.Typer(help="Rollups for the dashboards: refresh the dirty store-days, rebuild a range.",
                          no_args_is_help=True)  # fmt: skip
promotions_app = typer.Typer(
    help="Promotions: list, approve, reject, retract, expire and publish.", no_args_is_help=True
)


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@rules_app.command("load")
def rules_load(
    directory: Annotated[Path | None, typer.Option("--dir", help="folder of rule files and channels.yaml")] = None,
    templates: Annotated[Path | None, typer.Option("--templates", help="folder of promotion templates")] = None,
) -> None:
    """Validate the promotion templates and rule files (refused with line and reason), store the changed ones."""
    from store_rules.alerts.definitions import RULES_DIR, RuleDefinitionError
    from store_rules.promotions.templates import TEMPLATES_DIR, load_templates_and_rules

    try:
        with session_scope() as session:
            results = load_templates_and_rules(
                session=session, templates_dir=templates or TEMPLATES_DIR, rules_dir=directory or RULES_DIR
            )
    except RuleDefinitionError as exc:
        _fail(f"nothing loaded:\n{exc}")
        return
    for kind, version, created in results:
        typer.echo(f"{kind}: version {version} ({'new' if created else 'unchanged'})")


@rules_app.command("list")
def rules_list() -> None:
    """The version in force of every rule."""
    from store_rules.alerts.definitions import stored_rules

    with session_scope() as session:
        for rule in stored_rules(session=session):
            scope = "chain" if rule.scope.chain else ",".join(rule.scope.regions or rule.scope.stores)
            typer.echo(
                f"{rule.id:<26} v{rule.version:<3} {'enabled' if rule.enabled else 'draft  '} {rule.type:<17} "
                f"{rule.severity:<8} {scope:<10} → {rule.route.level} every {rule.cadence}"
            )


@rules_app.command("versions")
def rules_versions(rule_id: str) -> None:
    """Every stored version of one rule."""
    from store_rules.alerts.definitions import rule_versions

    with session_scope() as session:
        rows = rule_versions(session=session, rule_id=rule_id)
        if not rows:
            _fail(f"rule_id: no rule {rule_id!r}", 2)
        for row in rows:
            enabled = "enabled" if row.content.get("enabled", True) else "draft"
            typer.echo(
                f"v{row.version:<4} {row.loaded_at:%Y-%m-%d %H:%M:%S}  {enabled:<8} {row.checksum[:12]}  {row.source}"
            )


@rules_app.command("evaluate")
def rules_evaluate(
    rule_id: Annotated[str | None, typer.Argument(help="one rule (default: every enabled rule)")] = None,
    day: Annotated[
        str | None, typer.Option("--day", help="business day YYYY-MM-DD (default: each store's yesterday)")
    ] = None,
) -> None:
    """Evaluate now, as the scheduler does (raises and queues alerts)."""
    from store_rules.alerts.definitions import stored_rule, stored_rules
    from store_rules.alerts.service import evaluate_rule

    with session_scope() as session:
        if rule_id:
            found = stored_rule(session=session, rule_id=rule_id)
            if found is None:
                _fail(f"rule_id: no rule {rule_id!r}", 2)
            rules = [found] if found else []
        else:
            rules = stored_rules(session=session, enabled_only=True)
        for rule in rules:
            report = evaluate_rule(session=session, rule=rule, day=date.fromisoformat(day) if day else None)
            typer.echo(
                f"{rule.id}: {report.evaluated} evaluated, {len(report.raised)} raised, {report.resolved} resolved"
            )


@rules_app.command("backtest")
def rules_backtest(
    rule_id: str,
    from_: Annotated[str, typer.Option("--from", help="first business day YYYY-MM-DD")],
    to: Annotated[str, typer.Option("--to", help="last business day YYYY-MM-DD")],
    file: Annotated[Path | None, typer.Option("--file", help="a rule file not loaded yet (a draft)")] = None,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV on standard output instead of a table")] = False,
) -> None:
    """Replay stored history and list the alerts the rule would have raised; notifies nobody."""
    from store_rules.alerts.backtest import backtest
    from store_rules.alerts.definitions import RuleDefinitionError, parse_rule, stored_rule

    try:
        first, last = date.fromisoformat(from_), date.fromisoformat(to)
    except ValueError as exc:
        _fail(f"--from/--to: {exc}", 2)
        return
    with session_scope() as session:
        if file is not None:
            try:
                rule = parse_rule(file.read_text("utf-8"), str(file))
            except RuleDefinitionError as exc:
                _fail(str(exc), 2)
                return
            if rule.id != rule_id:
                _fail(f"--file: the file defines rule {rule.id!r}, not {rule_id!r}", 2)
        else:
            found = stored_rule(session=session, rule_id=rule_id)
            if found is None:
                _fail(f"rule_id: no rule {rule_id!r} (load it, or pass --file)", 2)
                return
            rule = found
        try:
            alerts = backtest(session=session, rule=rule, first=first, last=last)
        except ValueError as exc:
            _fail(str(exc), 2)
            return
    columns = ["raised_on", "store_id", "subject", "window_start", "window_end", "resolved_on", "evidence", "summary"]
    rows = [
        [a.raised_on.isoformat(), a.store_id, a.subject or "", a.window_start.isoformat(), a.window_end.isoformat(),
         a.resolved_on.isoformat() if a.resolved_on else "", str(a.evidence_count), a.summary.get("zh-CN", "")]
        for a in alerts
    ]  # fmt: skip
    if as_csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
        return
    typer.echo(f"{rule.id} v{rule.version or 'file'} ({'enabled' if rule.enabled else 'draft'}), {first} – {last}: "
               f"{len(alerts)} alert(s) would have been raised")  # fmt: skip
    if rows:
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns[:-1])]
        typer.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=False)) + "  summary")
        for row in rows:
            typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)) + "  " + row[-1])


def scheduler() -> None:
    """Evaluate the enabled rules on their cadence, deliver and escalate alerts (one active per database)."""
    from adapters.publish import publisher_for
    from store_rules.alerts.delivery import DeliveryPolicy
    from store_rules.alerts.scheduler import RuleScheduler

    settings = get_settings()
    runner = RuleScheduler(
        get_engine(settings.effective_database_url),
        policy=DeliveryPolicy.from_settings(settings),
        delivery_interval_s=settings.notify_interval_s,
        publisher=publisher_for(settings.promotion_publisher, settings),
    )

    def stop(signum: int, _frame: FrameType | None) -> None:
        typer.echo(f"scheduler: signal {signum}, stopping", err=True)
        runner.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    runner.run()


def _read_password(from_stdin: bool) -> str:
    if from_stdin or not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    return str(typer.prompt("password", hide_input=True, confirmation_prompt=True))


@users_app.command("create")
def users_create(
    user_id: str,
    name: Annotated[str, typer.Option("--name")],
    role: Annotated[str, typer.Option("--role", help="staff, manager, supervisor, headquarters or admin")],
    store: Annotated[str | None, typer.Option("--store")] = None,
    region: Annotated[str | None, typer.Option("--region")] = None,
    password: Annotated[bool, typer.Option("--password", help="also set a password for the pages (asked)")] = False,
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="read that password from stdin")] = False,
) -> None:
    """Create a person; their API token is printed once. With --password they can sign in to the pages."""
    from ingest.users import UserError, create_user, set_password

    secret = _read_password(password_stdin) if password or password_stdin else None
    try:
        with session_scope() as session:
            token = create_user(
                session=session, user_id=user_id, name=name, role=role, store_id=store, region_id=region
            )
            if secret is not None:
                set_password(session=session, user_id=user_id, password=secret, actor="cli")
    except UserError as exc:
        _fail(str(exc), 2)
        return
    typer.echo(f"user {user_id} ({role}) created; API token (shown once): {token}")
    if secret is not None:
        typer.echo(f"password set: {user_id} can sign in at /login")


@users_app.command("set-password")
def users_set_password(
    user_id: str,
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="read the password from stdin")] = False,
) -> None:
    """Set (or reset) a person's password for the pages; signs them out everywhere and lifts a lockout."""
    from ingest.users import UserError, set_password

    secret = _read_password(password_stdin)
    try:
        with session_scope() as session:
            set_password(session=session, user_id=user_id, password=secret, actor="cli")
    except UserError as exc:
        _fail(str(exc), 2)
        return
    typer.echo(f"password of {user_id} set")


@users_app.command("list")
def users_list() -> None:
    from ingest.users import list_users

    with session_scope() as session:
        for user in list_users(session=session):
            scope = user.store_id or user.region_id or "chain"
            state = "disabled" if user.disabled_at else "active"
            login = "password" if user.password_hash else "token only"
            typer.echo(f"{user.user_id:<16} {user.role:<13} {scope:<8} {state:<9} {login:<10} {user.name}")


@users_app.command("disable")
def users_disable(user_id: str) -> None:
    from ingest.users import disable_user

    with session_scope() as session:
        if not disable_user(session=session, user_id=user_id):
            _fail(f"user_id: no active user {user_id!r}", 1)
    typer.echo(f"user {user_id} disabled")


@alerts_app.command("list")
def alerts_list(status: Annotated[str | None, typer.Option("--status")] = None) -> None:
    """Alerts, newest first (customer names masked)."""
    from store_rules.alerts.service import list_alerts

    with session_scope() as session:
        for alert in list_alerts(session=session, status=status):
            typer.echo(
                f"#{alert.id:<5} {alert.raised_at:%Y-%m-%d %H:%M} {alert.status:<12} {alert.level:<12} "
                f"{alert.rule_id:<22} {alert.summary.get('zh-CN', '')}"
            )


@alerts_app.command("deliver")
def alerts_deliver() -> None:
    """One delivery pass now (what the scheduler does every few seconds)."""
    from store_rules.alerts.delivery import DeliveryPolicy, deliver_due

    settings = get_settings()
    report = deliver_due(
        engine=get_engine(settings.effective_database_url),
        policy=DeliveryPolicy.from_settings(settings),
    )
    typer.echo(
        f"claimed {report.claimed}, sent {report.sent} in {report.messages} message(s) ({report.digests} digests), "
        f"retrying {report.retried}, failed {report.failed}, deferred {report.deferred}"
    )
    for error in report.errors:
        typer.echo(f"  {error}", err=True)


@promotions_app.command("list")
def promotions_list(
    status: Annotated[str | None, typer.Option("--status", help="pending, active, rejected, ...")] = None,
    store: Annotated[str | None, typer.Option("--store")] = None,
) -> None:
    """Promotions, newest first."""
    from store_rules.promotions.service import list_promotions

    with session_scope() as session:
        for p in list_promotions(session=session, status=status, store_ids=[store] if store else None):
            typer.echo(
                f"{p.promotion_id:<18} {p.store_id:<6} {p.status:<9} {p.template_id:<16} {p.sku:<14} "
                f"{p.created_at:%Y-%m-%d %H:%M}  {p.title.get('zh-CN', '')}"
            )


def _decide(action: str, promotion_id: str, user: str, reason: str | None = None, params: str | None = None) -> None:
    import json

    from adapters.publish import publisher_for
    from store_rules.alerts import service as _alerts  # noqa: F401  (subscribes: a decided draft closes its alert)
    from store_rules.promotions import service

    settings = get_settings()
    engine = get_engine(settings.effective_database_url)
    try:
        with session_scope(engine) as session:
            if action == "approve":
                edits = json.loads(params) if params else None
                promotion = service.approve(session=session, promotion_id=promotion_id, user_id=user, params=edits)
            elif action == "reject":
                promotion = service.reject(
                    session=session, promotion_id=promotion_id, user_id=user, reason=reason or ""
                )
            else:
                promotion = service.retract(
                    session=session, promotion_id=promotion_id, user_id=user, reason=reason or ""
                )
            store_id, status = promotion.store_id, promotion.status
    except (service.PromotionError, json.JSONDecodeError) as exc:
        _fail(str(exc), 2)
        return
    typer.echo(f"{promotion_id}: {status}")
    if action != "reject":
        publisher = publisher_for(settings.promotion_publisher, settings)
        try:
            sent = service.publish_pending(engine=engine, publisher=publisher, store_ids=[store_id])
        finally:
            publisher.close()
        typer.echo(f"published: {', '.join(f'{s} v{v}' for s, v in sent) or 'nothing (the scheduler retries)'}")


@promotions_app.command("approve")
def promotions_approve(
    promotion_id: str,
    user: Annotated[str, typer.Option("--user", help="who decides (audited)")],
    params: Annotated[
        str | None, typer.Option("--params", help='edited parameters as JSON, e.g. {"percent": 20}')
    ] = None,
) -> None:
    """Approve a pending draft and publish the store's new set."""
    _decide("approve", promotion_id, user, params=params)


@promotions_app.command("reject")
def promotions_reject(
    promotion_id: str,
    user: Annotated[str, typer.Option("--user")],
    reason: Annotated[str, typer.Option("--reason")],
) -> None:
    """Reject a pending draft with a reason."""
    _decide("reject", promotion_id, user, reason=reason)


@promotions_app.command("retract")
def promotions_retract(
    promotion_id: str,
    user: Annotated[str, typer.Option("--user")],
    reason: Annotated[str, typer.Option("--reason")],
) -> None:
    """Take an active promotion off the tills and publish the store's new set."""
    _decide("retract", promotion_id, user, reason=reason)


@promotions_app.command("housekeeping")
def promotions_housekeeping() -> None:
    """Expire undecided drafts, end finished promotions and publish unpublished sets (the scheduler's job)."""
    from adapters.publish import publisher_for
    from store_rules.alerts import service as _alerts  # noqa: F401  (subscribes: an expired draft closes its alert)
    from store_rules.promotions import service

    settings = get_settings()
    engine = get_engine(settings.effective_database_url)
    with session_scope(engine) as session:
        done = service.expire_due(session=session)
    publisher = publisher_for(settings.promotion_publisher, settings)
    try:
        sent = service.publish_pending(engine=engine, publisher=publisher)
    finally:
        publisher.close()
    typer.echo(f"expired {len(done.expired)}, ended {len(done.ended)}, published {len(sent)} set(s)")


@rollups_app.command("refresh")
def rollups_refresh() -> None:
    """Recompute every dirty store-day now (what the scheduler does every minute)."""
    from store_rules import rollups

    total = 0
    while True:
        with session_scope() as session:
            done = rollups.refresh(session=session)
        total += done
        if not done:
            break
    typer.echo(f"{total} store-day(s) recomputed")


@rollups_app.command("rebuild")
def rollups_rebuild(
    from_: Annotated[str, typer.Option("--from", help="first business day YYYY-MM-DD")],
    to: Annotated[str, typer.Option("--to", help="last business day YYYY-MM-DD")],
    store: Annotated[list[str] | None, typer.Option("--store", help="only these stores")] = None,
) -> None:
    """Recompute every store-day of a range (after a bulk import, say), day by day."""
    from datetime import timedelta

    from store_rules import rollups

    try:
        first, last = date.fromisoformat(from_), date.fromisoformat(to)
    except ValueError as exc:
        _fail(f"--from/--to: {exc}", 2)
        return
    total, day = 0, first
    while day <= last:
        with session_scope() as session:
            total += rollups.rebuild(session=session, first=day, last=day, store_ids=store)
        day += timedelta(days=1)
    typer.echo(f"{total} store-day(s) rebuilt ({first} – {last})")
