"""The drop folder: files copied into a directory are imported once, then moved aside with a report.

A file is taken once it is complete:

- it is not a temporary name (`*.tmp`, `*.part`, names starting with `.`): a writer that writes
  `NAME.tmp` and renames it to `NAME` when done (an atomic rename) is never read half-written;
- its size and modification time have not changed for the settle time: a writer that writes in
  place (a copy over SMB, an export that appends) is waited for.

Then it is converted by the adapter, its events delivered, and it is moved to `DIR/done/` (every
event accepted or a duplicate) or `DIR/failed/` (the file could not be read, or events were
rejected: those are in the dead letters), with `NAME.report.json` beside it.

Restart-safe: the `import_files` table keys each file by its content's sha256 and records
`importing` before and `done` / `failed` after. A file found again whose content is `done`
(the process died between recording and moving) is only moved. A file left `importing` (the
process died mid-import) is imported again: its event ids make what was stored duplicates,
never doubles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from adapters.sources.base import AdapterContext, ImportReport, SourceAdapter
from adapters.sources.importer import Destination, ImportOutcome, adapter_named, deliver
from ingest.db import session_scope

log = logging.getLogger(__name__)

DONE = "done"
FAILED = "failed"
TEMPORARY_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload")
REPORT_SUFFIX = ".report.json"
RETRY_AFTER_S = 30.0


def adapter_from_spec(spec: str) -> tuple[str, SourceAdapter]:
    """`poslog` → the poslog adapter; `sales:NAME` → the sales adapter with profile NAME."""
    name, _, option = spec.partition(":")
    if name == "sales":
        if not option:
            raise LookupError("--adapter: sales needs its profile, e.g. sales:chaoyang_pharmacy")
        return spec, adapter_named("sales", profile=option)
    if option:
        raise LookupError(f"--adapter: {spec!r}: only sales takes a profile (sales:NAME)")
    return spec, adapter_named(name)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def is_candidate(path: Path) -> bool:
    name = path.name
    return (
        path.is_file()
        and not name.startswith(".")
        and not name.endswith(REPORT_SUFFIX)
        and not name.lower().endswith(TEMPORARY_SUFFIXES)
    )


@dataclass
class FileResult:
    path: Path
    moved_to: Path | None
    status: str  # done / failed / retry / dry-run
    outcome: ImportOutcome
    already_imported: bool = False


class DropFolder:
    """Watches one directory; `run` polls until `stop` is set, `process` imports one file."""

    def __init__(
        self,
        directory: Path,
        *,
        adapter_spec: str,
        store: Engine,
        destination: Destination | None,
        context_for: Callable[[str], AdapterContext],
        settle_s: float = 2.0,
        poll_s: float = 1.0,
        on_file: Callable[[FileResult], None] | None = None,
    ) -> None:
        self.directory = directory
        self.adapter_spec, self.adapter = adapter_from_spec(adapter_spec)
        self.store = store
        self.destination = destination
        self.context_for = context_for
        self.settle_s = settle_s
        self.poll_s = poll_s
        self.on_file = on_file
        self._seen: dict[Path, tuple[int, int, float]] = {}
        self._retry_at: dict[Path, float] = {}
        self._dry_done: set[Path] = set()
        (directory / DONE).mkdir(parents=True, exist_ok=True)
        (directory / FAILED).mkdir(parents=True, exist_ok=True)

    def _context(self) -> AdapterContext:
        return self.context_for(getattr(self.adapter, "source_name", self.adapter_spec.split(":")[0]))

    def ready_files(self, now: float | None = None) -> list[Path]:
        """Files whose size and mtime have been stable for the settle time, oldest first."""
        now = time.monotonic() if now is None else now
        ready: list[tuple[int, Path]] = []
        present: set[Path] = set()
        for path in self.directory.iterdir():
            if not is_candidate(path):
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue  # renamed away meanwhile
            present.add(path)
            previous = self._seen.get(path)
            if previous is None or previous[:2] != (stat.st_size, stat.st_mtime_ns):
                self._seen[path] = (stat.st_size, stat.st_mtime_ns, now)
                continue
            settled = now - previous[2] >= self.settle_s
            if settled and self._retry_at.get(path, 0.0) <= now and path not in self._dry_done:
                ready.append((stat.st_mtime_ns, path))
        for gone in set(self._seen) - present:
            self._seen.pop(gone, None)
            self._retry_at.pop(gone, None)
        return [path for _, path in sorted(ready)]

    def run(self, stop: threading.Event) -> None:
        log.info("watching %s for %s files (settle %.1f s)", self.directory, self.adapter_spec, self.settle_s)
        while not stop.is_set():
            for path in self.ready_files():
                if stop.is_set():
                    break
                self.process(path)
            stop.wait(self.poll_s)

    # --- one file ---------------------------------------------------------------------------

    def process(self, path: Path) -> FileResult:
        sha = file_sha256(path)
        if self.destination is None:
            result = self._dry_run(path)
        else:
            previous = self._begin(path, sha)
            if previous is not None:
                outcome = ImportOutcome(ImportReport(self.adapter_spec, path.name))
                result = FileResult(path, self._move(path, DONE, previous, sha), DONE, outcome, already_imported=True)
            else:
                result = self._import(path, sha)
        if self.on_file is not None:
            self.on_file(result)
        return result

    def _dry_run(self, path: Path) -> FileResult:
        self._dry_done.add(path)
        try:
            conversion = self.adapter.convert(path, context=self._context())
        except Exception as exc:
            outcome = ImportOutcome(ImportReport(self.adapter_spec, path.name), error=_read_error(exc), dry_run=True)
            return FileResult(path, None, "dry-run", outcome)
        return FileResult(path, None, "dry-run", deliver(conversion, None))

    def _begin(self, path: Path, sha: str) -> dict[str, Any] | None:
        """Record `importing`; the stored report when this content was already imported."""
        from ingest.models import ImportFile

        with session_scope(self.store) as session:
            row = session.get(ImportFile, sha, with_for_update=True)
            if row is not None and row.status == DONE:
                return {**(row.report or {}), "already_imported": True, "name": path.name}
            now = datetime.now(UTC)
            if row is None:
                session.add(ImportFile(sha256=sha, name=path.name[:500], adapter=self.adapter_spec[:100],
                                       status="importing", started_at=now))  # fmt: skip
            else:
                row.name, row.adapter, row.status, row.started_at, row.finished_at = (
                    path.name[:500], self.adapter_spec[:100], "importing", now, None)  # fmt: skip
        return None

    def _import(self, path: Path, sha: str) -> FileResult:
        try:
            conversion = self.adapter.convert(path, context=self._context())
        except Exception as exc:  # the adapter could not read or refused the file: that is the file's fault
            report = getattr(exc, "report", None)
            if not isinstance(report, ImportReport):
                report = ImportReport(self.adapter_spec, path.name)
            outcome = ImportOutcome(report, error=_read_error(exc))
            body = outcome.as_dict()
            with session_scope(self.store) as session:
                self._finish(session, sha, FAILED, body)
            return FileResult(path, self._move(path, FAILED, body, sha), FAILED, outcome)
        if conversion.report.file is None:
            conversion.report.file = path.name
        # Storing locally, the last chunk's transaction also records the file as done; sending to
        # a remote StorePulse, it is recorded once every batch was answered.
        local = getattr(self.destination, "engine", None) is self.store
        try:
            outcome = self._deliver_local(conversion, sha) if local else deliver(conversion, self.destination)
        except Exception as exc:  # the database is down: leave the file and try again later
            log.error("%s: not imported, will retry in %.0f s: %s", path.name, RETRY_AFTER_S, exc)
            self._retry_at[path] = time.monotonic() + RETRY_AFTER_S
            return FileResult(path, None, "retry", ImportOutcome(conversion.report, error=str(exc)))
        if outcome.error is not None:
            log.error("%s: not delivered, will retry in %.0f s: %s", path.name, RETRY_AFTER_S, outcome.error)
            self._retry_at[path] = time.monotonic() + RETRY_AFTER_S
            return FileResult(path, None, "retry", outcome)
        status = FAILED if outcome.failed else DONE
        body = outcome.as_dict()
        if not local:
            with session_scope(self.store) as session:
                self._finish(session, sha, status, body)
        return FileResult(path, self._move(path, status, body, sha), status, outcome)

    def _deliver_local(self, conversion: Any, sha: str) -> ImportOutcome:
        """Local delivery whose last chunk also records the file as done, in one transaction."""
        from adapters.sources.importer import LocalDestination
        from ingest.service import ingest_payloads

        destination = self.destination
        assert isinstance(destination, LocalDestination)
        statuses: list[tuple[str | None, str, str | None]] = []

        events = conversion.events
        size = destination.chunk_size
        starts = list(range(0, len(events), size)) or [0]
        for index, start in enumerate(starts):
            chunk = events[start : start + size]
            with session_scope(destination.engine) as session:
                stored = ingest_payloads(chunk, session=session, source=destination.source) if chunk else []
                chunk_statuses = [(r.event_id, r.status, r.error) for r in stored]
                if index == len(starts) - 1:
                    outcome = _outcome(conversion.report, [*statuses, *chunk_statuses])
                    self._finish(session, sha, FAILED if outcome.failed else DONE, outcome.as_dict())
            statuses.extend(chunk_statuses)
        return _outcome(conversion.report, statuses)

    def _finish(self, session: Session, sha: str, status: str, report: dict[str, Any]) -> None:
        from ingest.models import ImportFile

        row = session.get(ImportFile, sha)
        if row is not None:
            row.status, row.finished_at, row.report = status, datetime.now(UTC), report

    def _move(self, path: Path, status: str, report: dict[str, Any], sha: str) -> Path:
        """The report first, then the file (an atomic rename): a file in done/ always has its report."""
        folder = self.directory / status
        target = folder / path.name
        if target.exists():
            target = folder / f"{path.stem}-{sha[:8]}{path.suffix}"
        report_path = target.with_name(target.name + REPORT_SUFFIX)
        temporary = report_path.with_name(report_path.name + ".tmp")
        temporary.write_text(json.dumps(report, ensure_ascii=False, indent=2, default=str), encoding="utf-8")
        os.replace(temporary, report_path)
        os.replace(path, target)
        self._seen.pop(path, None)
        self._retry_at.pop(path, None)
        return target


def _outcome(report: ImportReport, statuses: list[tuple[str | None, str, str | None]]) -> ImportOutcome:
    outcome = ImportOutcome(report)
    for event_id, status, error in statuses:
        outcome.delivery[status] += 1
        if status == "rejected":
            outcome.rejections.append((event_id, error or "rejected"))
    return outcome


def _read_error(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return f"file not imported: {text}"
