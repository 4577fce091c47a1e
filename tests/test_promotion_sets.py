"""A store's tills always get exactly its active promotions: decisions racing on real parallel
connections (threads, each with its own transaction, released together by a barrier) leave a
newest set that holds every live promotion; the scan-time cache of sets is bounded."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

from sqlalchemy import Engine, select

from ingest.db import session_scope
from ingest.models import Store
from store_rules.promotions import service
from store_rules.promotions.models import ACTIVE, RETRACTED, Promotion, PromotionSet
from store_rules.promotions.templates import load_templates_dir, stored_template

NOW = datetime.now(UTC).replace(microsecond=0)


def drafts(engine: Engine, count: int, store_id: str = "S001", at: datetime = NOW, first: int = 0) -> list[str]:
    """`count` pending drafts of the amount-off template for one store, one SKU each, drafted `at`."""
    with session_scope(engine) as session:
        load_templates_dir(session=session)
        template = stored_template(session=session, template_id="amount_off")
        store = session.get(Store, store_id)
        assert template is not None and store is not None
        made = []
        for n in range(first, first + count):
            promotion = service.draft(
                session=session, store=store, sku=f"69{n:011d}", template=template, evidence={}, now=at
            )
            assert promotion is not None
            made.append(promotion.promotion_id)
    return made


def race(engine: Engine, actions: list[Callable[[Any], object]]) -> list[BaseException]:
    """Run each action in its own thread and transaction, all released at once; the errors raised."""
    barrier = threading.Barrier(len(actions))
    errors: list[BaseException] = []

    def run(action: Callable[[Any], object]) -> None:
        try:
            with session_scope(engine) as session:
                barrier.wait(timeout=30)
                action(session)
        except BaseException as exc:  # reported to the test below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(action,)) for action in actions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a decision hung"
    return errors


def sets_of(engine: Engine, store_id: str = "S001") -> list[tuple[int, set[str]]]:
    with session_scope(engine) as session:
        rows = session.execute(
            select(PromotionSet.version, PromotionSet.content)
            .where(PromotionSet.store_id == store_id)
            .order_by(PromotionSet.version)
        ).all()
    return [(version, {p["promotion_id"] for p in content["promotions"]}) for version, content in rows]


def approver(promotion_id: str, at: datetime = NOW) -> Callable[[Any], object]:
    def approve(session: Any) -> object:
        return service.approve(session=session, promotion_id=promotion_id, user_id="mgr-s001", now=at)

    return approve


def test_twenty_concurrent_approvals_for_one_store_all_reach_the_newest_set(pg_chain: Engine) -> None:
    made = drafts(pg_chain, 20)
    assert race(pg_chain, [approver(promotion_id) for promotion_id in made]) == []
    versions = sets_of(pg_chain)
    assert [version for version, _ in versions] == list(range(1, 21))
    assert versions[-1][1] == set(made)
    # Nothing was retracted: every version holds what the one before held, plus one approval.
    for (_, before), (_, after) in pairwise(versions):
        assert before < after and len(after - before) == 1
    with session_scope(pg_chain) as session:
        newest = service.current_set(session=session, store_id="S001")
    assert newest["version"] == 20 and len(newest["promotions"]) == 20


def test_an_approval_racing_a_retraction_publishes_the_approved_and_drops_the_retracted(pg_chain: Engine) -> None:
    live, retracted, fresh = drafts(pg_chain, 3)
    with session_scope(pg_chain) as session:
        for promotion_id in (live, retracted):
            service.approve(session=session, promotion_id=promotion_id, user_id="mgr-s001", now=NOW)

    def retract(session: Any) -> object:
        return service.retract(session=session, promotion_id=retracted, user_id="hq-1", reason="厂家召回", now=NOW)

    assert race(pg_chain, [approver(fresh), retract]) == []
    versions = sets_of(pg_chain)
    assert [version for version, _ in versions] == [1, 2, 3, 4]
    assert versions[1][1] == {live, retracted}
    assert versions[-1][1] == {live, fresh}  # whichever committed first, the newest set is exact
    assert versions[2][1] in ({live, retracted, fresh}, {live})
    with session_scope(pg_chain) as session:
        status = dict(session.execute(select(Promotion.promotion_id, Promotion.status)).all())
    assert status == {live: ACTIVE, retracted: RETRACTED, fresh: ACTIVE}


def test_approvals_racing_the_end_of_promotions_leave_only_the_live_ones(pg_chain: Engine) -> None:
    ending = drafts(pg_chain, 3)
    with session_scope(pg_chain) as session:
        for promotion_id in ending:
            service.approve(session=session, promotion_id=promotion_id, user_id="mgr-s001", now=NOW)
    # Eight days later their 7 days are over; housekeeping ends them while three new drafts are approved.
    later = NOW + timedelta(days=8)
    approving = drafts(pg_chain, 3, at=later - timedelta(hours=1), first=3)

    def housekeeping(session: Any) -> object:
        return service.expire_due(session=session, now=later)

    assert race(pg_chain, [housekeeping, *[approver(p, later) for p in approving]]) == []
    versions = sets_of(pg_chain)
    assert [version for version, _ in versions] == [1, 2, 3, 4, 5, 6, 7]
    assert versions[2][1] == set(ending)
    assert versions[-1][1] == set(approving)


def test_eight_concurrent_approvals_are_serialised_on_either_backend(chain: Engine) -> None:
    made = drafts(chain, 8)
    assert race(chain, [approver(promotion_id) for promotion_id in made]) == []
    versions = sets_of(chain)
    assert [version for version, _ in versions] == list(range(1, 9))
    assert versions[-1][1] == set(made)


def test_the_scan_cache_holds_a_bounded_number_of_stores_and_expires(chain: Engine) -> None:
    service.forget_cached_sets()
    with session_scope(chain) as session:
        for n in range(service_limit() + 500):
            assert service.active_for_sku(session=session, store_id=f"X{n:05d}", sku="6901234567890", ttl_s=60) == []
    assert service.cached_set_count() == service_limit()
    service.forget_cached_sets()
    assert service.cached_set_count() == 0


def service_limit() -> int:
    return int(getattr(service, "SET_CACHE_STORES", 1024))
