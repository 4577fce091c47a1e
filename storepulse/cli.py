"""Command line: `storepulse --help`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from ingest.db import get_engine, session_scope
from ingest.settings import get_settings
from storepulse.cli_dead_letters import dead_letters_app
from storepulse.cli_import import import_app
from storepulse.cli_rules import alerts_app, promotions_app, rollups_app, rules_app, users_app
from storepulse.cli_rules import scheduler as run_scheduler

app = typer.Typer(help="StorePulse: store sales monitoring for pharmacy chains.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
masterdata_app = typer.Typer(
    help="Master data (regions, stores, terminals, sensors, SKUs, staff, members).", no_args_is_help=True
)
token_app = typer.Typer(help="Device tokens for tills and counters.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(masterdata_app, name="masterdata")
app.add_typer(token_app, name="device-token")
config_app = typer.Typer(
    help="Counter-flow and scan-prompt definitions (seeds/config/*.yaml), versioned.", no_args_is_help=True
)
app.add_typer(config_app, name="config")
app.add_typer(rules_app, name="rules")
app.add_typer(users_app, name="users")
app.add_typer(alerts_app, name="alerts")
app.add_typer(promotions_app, name="promotions")
app.add_typer(rollups_app, name="rollups")
app.add_typer(dead_letters_app, name="dead-letters")
app.add_typer(import_app, name="import")


@app.command("scheduler")
def scheduler_command(verbose: bool = False) -> None:
    """Evaluate the enabled rules on their cadence, deliver and escalate alerts (one active per database)."""
    _require_safe_settings()
    _logging(verbose)
    run_scheduler()


def _require_safe_settings() -> None:
    from ingest.settings import InsecureSettingsError

    try:
        get_settings().require_safe_for_serving()
    except InsecureSettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Create or migrate the schema (hypertables on TimescaleDB)."""
    from ingest.migrate import upgrade

    _logging()
    upgrade(revision=revision)
    typer.echo(f"database at {revision}: {get_settings().effective_database_url.split('@')[-1]}")


@db_app.command("downgrade")
def db_downgrade(revision: str = "-1") -> None:
    """Step the schema back."""
    from ingest.migrate import downgrade

    downgrade(revision=revision)


@db_app.command("current")
def db_current() -> None:
    """Show the schema revision."""
    from ingest.migrate import current

    current()


@masterdata_app.command("import")
def masterdata_import(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    kind: Annotated[
        str | None, typer.Option(help="regions, stores, terminals, sensors, skus, staff or members")
    ] = None,
    skip_bad_rows: Annotated[bool, typer.Option("--skip-bad-rows", help="write the good rows anyway")] = False,
) -> None:
    """Import a CSV or XLSX file; a file with bad rows writes nothing unless --skip-bad-rows."""
    from ingest.masterdata import MasterDataError, import_file

    try:
        with session_scope() as session:
            reports = import_file(file, session=session, kind=kind, skip_bad_rows=skip_bad_rows)
    except MasterDataError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    failed = False
    for report in reports:
        for error in report.errors:
            typer.echo(f"{report.source} [{report.kind}] {error}", err=True)
        if report.written:
            typer.echo(
                f"{report.source} [{report.kind}]: {report.rows} rows, {report.inserted} inserted, "
                f"{report.updated} updated, {report.rows - report.inserted - report.updated} skipped"
            )
        else:
            failed = True
            typer.echo(f"{report.source} [{report.kind}]: {len(report.errors)} error(s), nothing written", err=True)
    if failed:
        raise typer.Exit(1)


@token_app.command("create")
def token_create(
    store: Annotated[str, typer.Option("--store", help="store id, e.g. S001")],
    name: Annotated[str | None, typer.Option("--name", help="device name, e.g. till-1")] = None,
) -> None:
    """Create a token; it is printed once and only its hash is kept."""
    from ingest.tokens import TokenError, create_token

    try:
        with session_scope() as session:
            issued = create_token(session=session, store_id=store, name=name)
    except TokenError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"token id {issued.id} for store {issued.store_id} ({issued.name}); it is shown only once:")
    typer.echo(issued.token)


@token_app.command("list")
def token_list(store: Annotated[str | None, typer.Option("--store")] = None) -> None:
    """List tokens (never the tokens themselves)."""
    from ingest.tokens import list_tokens

    with session_scope() as session:
        rows = list_tokens(session=session, store_id=store)
        typer.echo(f"{'id':>4}  {'store':<8} {'name':<20} {'prefix':<12} {'created':<20} {'last used':<20} status")
        for row in rows:
            typer.echo(
                f"{row.id:>4}  {row.store_id:<8} {row.name:<20} {row.token_prefix + '…':<12} "
                f"{row.created_at:%Y-%m-%d %H:%M:%S}  "
                f"{row.last_used_at.strftime('%Y-%m-%d %H:%M:%S') if row.last_used_at else '-':<20} "
                f"{'revoked' if row.revoked_at else 'active'}"
            )


@token_app.command("revoke")
def token_revoke(token_id: int) -> None:
    """Revoke a token by id; devices using it get 401 from then on."""
    from ingest.tokens import revoke_token

    with session_scope() as session:
        done = revoke_token(session=session, token_id=token_id)
    if not done:
        typer.echo(f"error: no active token with id {token_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"token {token_id} revoked")


@config_app.command("load")
def config_load(
    directory: Annotated[
        Path | None, typer.Option("--dir", help="folder with counter_flow.yaml and prompts.yaml")
    ] = None,
) -> None:
    """Validate and store the definitions; a changed file becomes a new version."""
    from store_rules.definitions import CONFIG_DIR, DefinitionError, load_config_dir

    try:
        with session_scope() as session:
            results = load_config_dir(session=session, directory=directory or CONFIG_DIR)
    except DefinitionError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for kind, version, created in results:
        typer.echo(f"{kind}: version {version} ({'new' if created else 'unchanged'})")


@config_app.command("versions")
def config_versions() -> None:
    """List the stored versions of the definitions."""
    from store_rules.definitions import versions

    with session_scope() as session:
        for row in versions(session=session):
            typer.echo(
                f"{row.kind:<14} v{row.version:<4} {row.loaded_at:%Y-%m-%d %H:%M:%S}  {row.checksum[:12]}  {row.source}"
            )


@app.command()
def metrics(
    store: Annotated[str, typer.Option("--store", help="store id, e.g. S001")],
    day: Annotated[str | None, typer.Option("--day", help="local business day YYYY-MM-DD (default: yesterday)")] = None,
) -> None:
    """A store's counter-flow and sales metrics for one business day."""
    from datetime import date, datetime, timedelta

    from store_rules.metrics import UnknownStore, day_metrics

    wanted = date.fromisoformat(day) if day else (datetime.now(get_settings().chain_tz) - timedelta(days=1)).date()
    try:
        with session_scope() as session:
            result = day_metrics(session=session, store_id=store, day=wanted)
    except UnknownStore as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{store} {wanted} ({result.timezone})")
    for label, value in (
        ("step completeness", result.step_completeness),
        ("symptom-record completeness", result.symptom_completeness),
        ("insurance pass rate", result.insurance_pass_rate),
        ("traceability", result.traceability),
        ("conversion", result.conversion_rate),
        ("average ticket", result.average_ticket),
    ):
        typer.echo(f"  {label:<28} {value}")
    for prompt in result.prompt_answers.prompts:
        shares = ", ".join(f"{a.answer} {a.share}" for a in prompt.answers)
        typer.echo(f"  prompt {prompt.prompt_id} on {prompt.sku}: {shares}")


@app.command()
def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    access_log: Annotated[bool, typer.Option(help="log every request (costs ~4 % of the server's CPU)")] = False,
) -> None:
    """Serve the HTTP API and the pages."""
    import uvicorn

    from dashboard.app import create_app

    _require_safe_settings()
    _logging()
    uvicorn.run(create_app(), host=host, port=port, log_level="info", access_log=access_log)


@app.command("ingest-worker")
def ingest_worker(
    shared_group: Annotated[str | None, typer.Option(help="join $share/<group>/... to split load")] = None,
    client_id: Annotated[str | None, typer.Option(help="MQTT client id (persistent session key)")] = None,
    health_port: Annotated[
        int | None, typer.Option(help="serve GET /healthz on this port (STOREPULSE_INGEST_HEALTH_PORT)")
    ] = None,
    verbose: bool = False,
) -> None:
    """Consume the MQTT event topics into the database (QoS 1, ack after commit)."""
    from ingest.mqtt_worker import IngestWorker

    _require_safe_settings()
    _logging(verbose)
    settings = get_settings()
    if not settings.mqtt_url:
        typer.echo("error: STOREPULSE_MQTT_URL is not set (e.g. mqtt://127.0.0.1:1883)", err=True)
        raise typer.Exit(2)
    overrides = {"mqtt_shared_group": shared_group, "mqtt_client_id": client_id, "ingest_health_port": health_port}
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None and v != ""})
    worker = IngestWorker(settings, get_engine(settings.effective_database_url))
    sys.exit(worker.run_forever())


@app.command()
def demo(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    days: Annotated[int, typer.Option(help="complete days of history before today")] = 30,
    live: Annotated[bool, typer.Option("--live/--no-live", help="post a live trickle of events to the API")] = True,
    database_url: Annotated[
        str | None, typer.Option(help="database to fill instead of a fresh var/demo.db (not emptied first)")
    ] = None,
) -> None:
    """Run the demo chain: a fresh SQLite database, history, a live event trickle and the pages."""
    from seeds.demo import DemoError, run_demo

    _require_safe_settings()
    _logging()
    try:
        run_demo(host=host, port=port, days=days, live=live, database_url=database_url)
    except DemoError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
