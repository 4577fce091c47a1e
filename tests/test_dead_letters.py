"""Dead letters can be seen and replayed: events for a store that was not imported yet are
refused, listed with the reason, and stored exactly once by a replay after the import.

The replay runs through the service and through the real `storepulse` command (a subprocess on
the same database); the pages are walked over real HTTP as an admin and as other roles.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, func, select, text

from ingest.db import session_scope
from ingest.masterdata import import_file
from ingest.models import AuditEntry, DeadLetter
from ingest.service import ingest_payloads
from tests.conftest import LiveServer, create_people, make_app, sign_in
from tests.factories import footfall, receipt, step

POS_TOPIC = "mqtt:storepulse/v1/{store}/pos/T1/events"
PASSWORD = "correct horse battery"


def storepulse(engine: Engine, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "STOREPULSE_DATABASE_URL": engine.url.render_as_string(hide_password=False),
        "STOREPULSE_ENV": "dev",
    }
    return subprocess.run(
        [sys.executable, "-m", "storepulse", *args], env=env, capture_output=True, text=True, timeout=120
    )


def counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            table: int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
            for table in ("receipts", "receipt_lines", "footfall", "dead_letters")
        }


def replay_columns(engine: Engine) -> dict[str, tuple[Any, ...]]:
    with session_scope(engine) as session:
        return {
            d.event_id or "": (d.replay_status, d.replay_note, d.replayed_at)
            for d in session.scalars(select(DeadLetter).order_by(DeadLetter.id))
        }


def letter_id(engine: Engine, event_id: str) -> int:
    with session_scope(engine) as session:
        found = session.scalar(select(DeadLetter.id).where(DeadLetter.event_id == event_id))
    assert found is not None, event_id
    return found


def import_store(engine: Engine, tmp_path: Path, store_id: str) -> None:
    stores = tmp_path / "stores.csv"
    stores.write_text(f"store_id,region_id,name_zh,name_en\n{store_id},R-ZJ,宁波鄞州店,Ningbo Yinzhou\n", "utf-8")
    with session_scope(engine) as session:
        (report,) = import_file(stores, session=session)
    assert (report.inserted, report.errors) == (1, [])


def refuse_unknown_stores(engine: Engine) -> None:
    """Two receipts and a footfall reading for S009 (not imported yet) and a receipt for S404 (never)."""
    with session_scope(engine) as session:
        results = ingest_payloads(
            [receipt(1, store_id="S009", lines=2), receipt(2, store_id="S009", lines=3), footfall(1, store_id="S009")],
            session=session, source=POS_TOPIC.format(store="S009"),
        )  # fmt: skip
        results += ingest_payloads(
            [receipt(3, store_id="S404", lines=1)], session=session, source=POS_TOPIC.format(store="S404")
        )
    assert [r.status for r in results] == ["rejected"] * 4


def test_unknown_store_is_replayed_exactly_once_after_the_store_is_imported(chain: Engine, tmp_path: Path) -> None:
    refuse_unknown_stores(chain)
    shown = storepulse(chain, "dead-letters", "list", "--reason", "unknown store 'S009'", "--since", "2026-01-01")
    assert shown.returncode == 0, shown.stderr
    assert "3 dead letter(s) match; showing 3" in shown.stdout
    assert "received (Asia/Shanghai)" in shown.stdout
    assert shown.stdout.count("store_id: unknown store 'S009'") == 3 and "S404" not in shown.stdout
    # Imported here, so that on a checkout without the service this test fails on the command above.
    from ingest.dead_letters import list_dead_letters, replay_candidates, replay_dead_letters

    with session_scope(chain) as session:
        listed = list_dead_letters(session=session, reason="unknown store")
        assert [(d.event_id, d.store_id, d.reason) for d in listed] == [
            ("S404-T1-3", "S404", "store_id: unknown store 'S404'"),
            ("ff-S009-1", "S009", "store_id: unknown store 'S009'"),
            ("S009-T1-2", "S009", "store_id: unknown store 'S009'"),
            ("S009-T1-1", "S009", "store_id: unknown store 'S009'"),
        ]
        assert len(list_dead_letters(session=session, source="/S009/", reason="STORE_ID")) == 3
        assert list_dead_letters(session=session, replayed=True) == []
    detail = storepulse(chain, "dead-letters", "show", str(letter_id(chain, "S009-T1-1")))
    assert detail.returncode == 0, detail.stderr
    assert "not replayed" in detail.stdout and '"receipt_id": "R1"' in detail.stdout
    before = counts(chain)
    assert before == {"receipts": 0, "receipt_lines": 0, "footfall": 0, "dead_letters": 4}

    import_store(chain, tmp_path, "S009")

    # A dry run validates against today's master data but writes nothing at all.
    with session_scope(chain) as session:
        ids = replay_candidates(session=session)
        dry = replay_dead_letters(session=session, ids=ids, dry_run=True, actor="test")
    assert dry.counts == {"accepted": 2, "duplicate": 0, "rejected": 2, "skipped": 0}
    dry_cli = storepulse(chain, "dead-letters", "replay", "--all", "--dry-run")
    assert dry_cli.returncode == 0, dry_cli.stderr
    assert (
        "dry run, nothing written: 4 dead letter(s): 2 accepted, 0 duplicate (already stored), 2 rejected again, "
        "0 skipped (already replayed)"
    ) in dry_cli.stdout
    assert counts(chain) == before
    assert {status for status, _, _ in replay_columns(chain).values()} == {None}

    started = datetime.now(UTC)
    replayed = storepulse(chain, "dead-letters", "replay", "--all")
    assert replayed.returncode == 0, replayed.stderr
    assert (
        "4 dead letter(s): 2 accepted, 0 duplicate (already stored), 2 rejected again, 0 skipped (already replayed)"
    ) in replayed.stdout
    after = counts(chain)
    # Stored once, the dead letters kept, and no second dead letter for the ones refused again.
    assert after == {"receipts": 2, "receipt_lines": 5, "footfall": 0, "dead_letters": 4}
    columns = replay_columns(chain)
    for event_id in ("S009-T1-1", "S009-T1-2"):
        status, note, replayed_at = columns[event_id]
        assert (status, note) == ("accepted", None)
        assert started <= replayed_at <= datetime.now(UTC)
    # The topic still names a till: a footfall reading is not accepted there, whatever the store.
    assert columns["ff-S009-1"] == ("rejected", "type: 'footfall' events are not accepted on the pos topic", None)
    assert columns["S404-T1-3"] == ("rejected", "store_id: unknown store 'S404'", None)
    with session_scope(chain) as session:
        stored = session.execute(text("SELECT event_id, store_id FROM receipts ORDER BY event_id")).all()
        assert [tuple(row) for row in stored] == [("S009-T1-1", "S009"), ("S009-T1-2", "S009")]
        audited = session.scalars(select(AuditEntry).where(AuditEntry.action == "dead_letters_replay")).all()
        assert [(a.actor, a.detail["counts"]) for a in audited] == [
            ("cli", {"accepted": 2, "duplicate": 0, "rejected": 2, "skipped": 0})
        ]

    # A second replay changes nothing: the replayed letters are skipped, the others refused again.
    with session_scope(chain) as session:
        again = replay_dead_letters(session=session, ids=replay_candidates(session=session), actor="test")
    assert again.counts == {"accepted": 0, "duplicate": 0, "rejected": 2, "skipped": 2}
    assert [o.outcome for o in again.letters] == ["skipped", "skipped", "rejected", "rejected"]
    third = storepulse(chain, "dead-letters", "replay", "--reason", "unknown store 'S009'")
    assert third.returncode == 0, third.stderr
    assert "3 dead letter(s): 0 accepted, 0 duplicate (already stored), 1 rejected again, 2 skipped" in third.stdout
    assert counts(chain) == after
    assert replay_columns(chain) == columns


def test_replay_of_an_event_stored_meanwhile_is_a_duplicate_and_bad_choices_are_named(
    chain: Engine, tmp_path: Path
) -> None:
    refuse_unknown_stores(chain)
    import_store(chain, tmp_path, "S009")
    # The till sent the receipt again after the import: the replay finds it stored.
    with session_scope(chain) as session:
        (resent,) = ingest_payloads([receipt(1, store_id="S009", lines=2)], session=session, source="http:till-1")
    assert resent.status == "accepted"
    one = storepulse(chain, "dead-letters", "replay", "--id", str(letter_id(chain, "S009-T1-1")))
    assert one.returncode == 0, one.stderr
    assert "1 dead letter(s): 0 accepted, 1 duplicate (already stored), 0 rejected again, 0 skipped" in one.stdout
    assert counts(chain)["receipts"] == 1
    assert replay_columns(chain)["S009-T1-1"][:2] == ("duplicate", None)

    both = storepulse(chain, "dead-letters", "replay", "--all", "--id", "2")
    assert both.returncode == 2 and "choose exactly one of --id N, --reason TEXT or --all" in both.stderr
    missing = storepulse(chain, "dead-letters", "replay", "--id", "99")
    assert missing.returncode == 1 and "id: no dead letter 99" in missing.stderr
    bad_since = storepulse(chain, "dead-letters", "list", "--since", "yesterday")
    assert bad_since.returncode == 2
    assert "--since: expected a date YYYY-MM-DD or an ISO time, got 'yesterday'" in bad_since.stderr
    assert storepulse(chain, "dead-letters", "show", "99").returncode == 1


@pytest.fixture
def people(chain: Engine) -> Engine:
    create_people(
        chain,
        {
            "it-admin": ("admin", {}),
            "hq": ("headquarters", {}),
            "mgr-s001": ("manager", {"store_id": "S001"}),
        },
        PASSWORD,
    )
    return chain


def test_admin_page_lists_shows_and_replays_dead_letters_others_get_403(people: Engine, tmp_path: Path) -> None:
    refuse_unknown_stores(people)
    unknown_step = step(7, store_id="S009", receipt_note="<script>alert(1)</script>")
    with session_scope(people) as session:
        ingest_payloads([unknown_step], session=session, source="http:till-1")
    first, other_id, step_letter = (letter_id(people, e) for e in ("S009-T1-1", "S009-T1-2", "step-7"))
    import_store(people, tmp_path, "S009")
    with LiveServer(make_app(people)) as server:
        with closing(sign_in(server.url, "it-admin", PASSWORD)) as admin:
            home = admin.get("/promotions")
            assert '<a href="/admin/dead-letters">Dead letters</a>' in home.text
            listed = admin.get("/admin/dead-letters")
            assert listed.status_code == 200
            assert "5 of 5 shown, newest first" in listed.text
            assert "Received (Asia/Shanghai)" in listed.text
            assert listed.text.count("store_id: unknown store &#39;S009&#39;") == 4
            row = re.search(rf'<tr id="dead-letter-{first}">(.*?)</tr>', listed.text, re.S)
            assert row is not None
            with session_scope(people) as session:
                received = session.get(DeadLetter, first).received_at  # type: ignore[union-attr]
            # Shown in the chain's time zone (UTC+8), not in UTC.
            assert f"{received.astimezone(ZoneInfo('Asia/Shanghai')):%Y-%m-%d %H:%M:%S}" in row.group(1)
            assert "mqtt:storepulse/v1/S009/pos/T1/events" in row.group(1) and "not replayed" in row.group(1)
            filtered = admin.get("/admin/dead-letters", params={"reason": "S404"})
            assert (
                "1 of 1 shown" in filtered.text
                and f'id="dead-letter-{letter_id(people, "S404-T1-3")}"' in filtered.text
            )
            assert "1 of 1 shown" in admin.get("/admin/dead-letters", params={"source": "http:"}).text

            detail = admin.get(f"/admin/dead-letters/{step_letter}")
            assert detail.status_code == 200
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in detail.text and "<script>alert(1)" not in detail.text
            assert "王*国" in detail.text and "王建国" not in detail.text
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', detail.text)
            assert csrf is not None
            refused = admin.post(f"/admin/dead-letters/{first}/replay", data={"csrf_token": "wrong"})
            assert refused.status_code == 403
            replayed = admin.post(f"/admin/dead-letters/{first}/replay", data={"csrf_token": csrf.group(1)})
            assert replayed.status_code == 303 and replayed.headers["location"] == f"/admin/dead-letters/{first}"
            after = admin.get(f"/admin/dead-letters/{first}").text
            assert "replayed: stored" in after and "Replay now" not in after
            assert (
                "2 of 2 shown" in admin.get("/admin/dead-letters", params={"source": "/S009/", "state": "pending"}).text
            )
        for user_id in ("hq", "mgr-s001"):
            with closing(sign_in(server.url, user_id, PASSWORD)) as other:
                assert "/admin/dead-letters" not in other.get("/promotions").text
                assert other.get("/admin/dead-letters").status_code == 403, user_id
                assert other.get(f"/admin/dead-letters/{other_id}").status_code == 403, user_id
                token = re.search(r'name="csrf_token" value="([^"]+)"', other.get("/promotions").text)
                assert token is not None
                replay = other.post(f"/admin/dead-letters/{other_id}/replay", data={"csrf_token": token.group(1)})
                assert replay.status_code == 403, user_id
    assert counts(people)["receipts"] == 1
    with session_scope(people) as session:
        entry = session.scalar(select(AuditEntry).where(AuditEntry.action == "dead_letters_replay"))
        assert entry is not None and (entry.actor, entry.target) == ("it-admin", str(first))
        assert (
            session.scalar(select(func.count()).select_from(DeadLetter).where(DeadLetter.replayed_at.is_not(None))) == 1
        )


def test_replay_keeps_the_transport_limits_and_records_a_till_ack(chain: Engine, tmp_path: Path) -> None:
    from ingest.dead_letters import replay_candidates, replay_dead_letters
    from ingest.models import PromotionAck
    from ingest.service import dead_letter
    from ingest.tokens import create_token

    ack_topic = "mqtt:storepulse/v1/S009/pos/T1/ack"
    with session_scope(chain) as session:
        create_token(session=session, store_id="S001", name="till-1")
        # What the ingest worker writes for an ack of a store not imported yet, and for a message that is not JSON.
        dead_letter(
            session=session, source=ack_topic, reason="store_id: unknown store 'S009'",
            raw_payload='{"promotions_version": 3}',
        )  # fmt: skip
        dead_letter(
            session=session,
            source=POS_TOPIC.format(store="S009"),
            reason="payload: not valid JSON",
            raw_payload="{nope",
        )
        # A till of S001 sending a receipt of S002 over HTTP.
        (refused,) = ingest_payloads(
            [receipt(5, store_id="S002", lines=1)], session=session, source="http:till-1", allowed_store_id="S001"
        )
    assert refused.error == "store_id: this device token publishes for store 'S001' only"
    import_store(chain, tmp_path, "S009")
    with session_scope(chain) as session:
        received = {d.source: d.received_at for d in session.scalars(select(DeadLetter))}
        report = replay_dead_letters(session=session, ids=replay_candidates(session=session))
    assert [(o.source, o.outcome, o.note) for o in report.letters] == [
        (ack_topic, "accepted", None),
        (
            POS_TOPIC.format(store="S009"),
            "rejected",
            "payload: not valid JSON (unexpected character, expected a string key: line 1 column 2 (char 1))",
        ),
        ("http:till-1", "rejected", "store_id: this device token publishes for store 'S001' only"),
    ]
    with session_scope(chain) as session:
        acks = [
            (a.store_id, a.terminal_id, a.promotions_version, a.acked_at) for a in session.scalars(select(PromotionAck))
        ]
    # The till applied the version when it said so, not when the ack was replayed.
    assert acks == [("S009", "T1", 3, received[ack_topic])]
    assert counts(chain) == {"receipts": 0, "receipt_lines": 0, "footfall": 0, "dead_letters": 3}
