"""Stock, expiry and promotions on hand-built stock and sales, on SQLite and TimescaleDB.

The stock-watch scenario puts three stores on either side of each threshold in one
evaluation: S001 fires (on-hand 9 < safety 10, sales 71 vs 50 = +42 %), S002 sits exactly on
the growth threshold (+40 % is not "more than 40 %"), S003 exactly on its safety stock.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, select

from ingest import audit
from ingest.db import session_scope
from ingest.masterdata import import_file
from ingest.models import SafetyStock, Sku, Terminal
from ingest.service import record_promotion_ack
from store_rules.alerts import service as alerts
from store_rules.alerts.definitions import RuleDefinitionError, parse_rule
from store_rules.alerts.models import RESOLVED, Alert, Notification
from store_rules.promotions import service
from store_rules.promotions.models import ACTIVE, ENDED, EXPIRED, PENDING, REJECTED, RETRACTED, Promotion
from store_rules.promotions.templates import (
    TEMPLATES_DIR,
    load_templates_and_rules,
    load_templates_dir,
    parse_template,
)
from tests.test_alerts import CHANNELS, seed_rule
from tests.test_metrics import SHANGHAI, ingest, local

FLOW = "6901234567890"  # 参松养心胶囊, category cardio
COLD = "6943343174318"  # 连花清瘟胶囊, category cold
GIFT = "6901574461881"  # 医用外科口罩, the clearance template's gift
D = date(2026, 11, 20)
CLOSING = datetime(2026, 11, 21, 1, 0, tzinfo=SHANGHAI)


def add_master_data(engine: Engine) -> None:
    with session_scope(engine) as session:
        session.add_all(
            [
                Sku(sku=COLD, name_zh="连花清瘟胶囊", name_en="Lianhua Qingwen capsules", category="cold"),
                Sku(sku=GIFT, name_zh="医用外科口罩", name_en="surgical masks", category="devices"),
                Terminal(store_id="S001", terminal_id="T2", name="till 2"),
                Terminal(store_id="S001", terminal_id="T3", name="till 3"),
                SafetyStock(store_id="S001", sku=FLOW, safety_stock=Decimal(10), lead_time_days=5),
                SafetyStock(store_id="*", sku=FLOW, safety_stock=Decimal(10), lead_time_days=5),
            ]
        )
        load_templates_dir(session=session)


def stock(
    store_id: str, sku: str, on_hand: int, at: datetime, lots: list[tuple[str, int, date]] | None = None
) -> dict[str, Any]:
    return {
        "type": "stock",
        "event_id": f"stk-{store_id}-{sku}-{at:%Y%m%d%H%M}",
        "store_id": store_id,
        "occurred_at": at.isoformat(),
        "sku": sku,
        "on_hand": on_hand,
        "lots": [{"lot": lot, "qty": qty, "expires_on": expires.isoformat()} for lot, qty, expires in lots or []],
    }


def sold(
    store_id: str,
    sku: str,
    at: datetime,
    units: int,
    *,
    promotion_id: str | None = None,
    kind: str = "sale",
    n: int = 0,
) -> dict[str, Any]:
    sign = -1 if kind == "return" else 1
    amount = Decimal("10.00") * units * sign
    return {
        "type": "receipt",
        "event_id": f"r-{store_id}-{sku}-{at:%Y%m%d%H%M%S}-{n}",
        "store_id": store_id,
        "terminal_id": "T1",
        "receipt_id": f"R{at:%m%d%H%M%S}{n}",
        "occurred_at": at.isoformat(),
        "kind": kind,
        "staff_id": "E0101",
        "lines": [
            {
                "line_no": 1,
                "sku": sku,
                "qty": units * sign,
                "unit_price": "10.00",
                "amount": str(amount),
                "promotion_id": promotion_id,
            }
        ],
        "total": str(amount),
    }


def window_sales(store_id: str, previous: int, recent: int) -> list[dict[str, Any]]:
    """`previous` units over D-13..D-7 and `recent` units over D-6..D, spread over the days."""
    events = []
    for first, total in ((D - timedelta(days=13), previous), (D - timedelta(days=6), recent)):
        per_day = [total // 7 + (1 if i < total % 7 else 0) for i in range(7)]
        for offset, units in enumerate(per_day):
            events.append(sold(store_id, FLOW, local(first + timedelta(days=offset), 15), units))
    return events


def stock_watch_scenario(engine: Engine) -> None:
    add_master_data(engine)
    events = window_sales("S001", 50, 71) + window_sales("S002", 50, 70) + window_sales("S003", 50, 71)
    # The newest snapshot at the close of D counts: not the older one, not the one after the close.
    events += [
        stock("S001", FLOW, 30, local(D - timedelta(days=1), 7)),
        stock("S001", FLOW, 9, local(D, 7, 30)),
        stock("S001", FLOW, 80, local(D + timedelta(days=1), 7, 30)),
        stock("S002", FLOW, 9, local(D, 7, 30)),
        stock("S003", FLOW, 10, local(D, 7, 30)),
    ]
    ingest(engine, events)


def evaluate(engine: Engine, name: str, *, day: date = D, now: datetime = CLOSING) -> alerts.EvaluationReport:
    with session_scope(engine) as session:
        return alerts.evaluate_rule(session=session, rule=seed_rule(name), day=day, now=now, channels=CHANNELS)


def promotions_of(engine: Engine) -> list[Promotion]:
    with session_scope(engine) as session:
        rows = list(session.scalars(select(Promotion).order_by(Promotion.store_id, Promotion.sku)))
        session.expunge_all()
        return rows


def test_stock_watch_drafts_exactly_one_promotion_at_the_threshold_and_none_just_below(chain: Engine) -> None:
    stock_watch_scenario(chain)
    report = evaluate(chain, "stock_watch")
    assert report.evaluated == 3
    (promotion,) = promotions_of(chain)
    assert (promotion.store_id, promotion.sku, promotion.template_id) == ("S001", FLOW, "clearance_gift")
    assert promotion.status == PENDING
    assert promotion.kind == "gift_with_purchase"
    assert promotion.params == {"min_qty": 2, "gift_qty": 1, "percent": 10}
    assert promotion.eligible_skus == [FLOW]
    assert promotion.title["zh-CN"] == "参松养心胶囊 清仓特惠：满2件减10%，赠医用外科口罩×1"
    assert promotion.title["en"] == "Shensong Yangxin capsules clearance: buy 2, 10 % off and 1 × surgical masks free"
    evidence = promotion.evidence
    assert (evidence["on_hand"], evidence["safety_stock"]) == (9, 10)
    assert (evidence["sales_last"], evidence["sales_previous"], evidence["growth_percent"]) == (71, 50, 42.0)
    assert promotion.decide_by == CLOSING.astimezone(UTC) + timedelta(hours=24)
    with session_scope(chain) as session:
        alert = session.scalars(select(Alert)).one()
        assert (alert.id, alert.level, alert.role, alert.subject) == (promotion.alert_id, "store", "manager", FLOW)
        assert "参松养心胶囊 库存 9 低于安全库存 10" in alert.summary["zh-CN"]
        # The manager hears of the draft through the channels of the rules issue.
        assert [n.channel_id for n in session.scalars(select(Notification))] == ["managers"]


def test_a_second_evaluation_drafts_nothing_new(chain: Engine) -> None:
    stock_watch_scenario(chain)
    assert len(evaluate(chain, "stock_watch").raised) == 1
    assert evaluate(chain, "stock_watch").raised == []
    assert evaluate(chain, "stock_watch", now=CLOSING + timedelta(hours=5)).raised == []
    assert len(promotions_of(chain)) == 1


def test_a_rejected_draft_is_not_redrafted_within_the_cooldown(chain: Engine) -> None:
    add_master_data(chain)
    seeded = seed_rule("stock_watch")
    daily = seeded.model_copy(update={"params": seeded.params.model_copy(update={"window_days": 1})})
    no_cooldown = daily.model_copy(update={"params": daily.params.model_copy(update={"cooldown_days": 0})})
    units = {
        D - timedelta(days=1): 10,
        D: 15,
        D + timedelta(days=1): 22,
        D + timedelta(days=8): 10,
        D + timedelta(days=9): 15,
    }
    ingest(chain, [sold("S001", FLOW, local(day, 15), n) for day, n in units.items()])
    ingest(chain, [stock("S001", FLOW, 9, local(D, 7, 30))])

    def run(rule: Any, day: date) -> list[str]:
        with session_scope(chain) as session:
            now = CLOSING + timedelta(days=(day - D).days)
            return alerts.evaluate_rule(session=session, rule=rule, day=day, now=now, channels=CHANNELS).raised

    assert len(run(daily, D)) == 1  # 15 vs 10: +50 %
    (draft,) = promotions_of(chain)
    with session_scope(chain) as session:
        service.reject(
            session=session, promotion_id=draft.promotion_id, user_id="mgr-s001", reason="货已在路上", now=CLOSING
        )
    day_after = D + timedelta(days=1)  # 22 vs 15: +46.7 %, fires again ...
    assert run(daily, day_after) == []  # ... but the rejection holds it back for 7 days
    assert len(promotions_of(chain)) == 1
    with session_scope(chain) as session:  # without a cooldown the same evaluation would draft
        assert session.scalar(select(Promotion.id).where(Promotion.status == PENDING)) is None
    assert len(run(daily, D + timedelta(days=9))) == 1  # after the cooldown: a new draft
    assert sorted(p.status for p in promotions_of(chain)) == [PENDING, REJECTED]
    assert run(no_cooldown, D + timedelta(days=9)) == []  # the new draft is pending: never a second one


def test_expiry_watch_picks_exactly_the_lots_inside_the_window(chain: Engine) -> None:
    add_master_data(chain)
    ingest(
        chain,
        [
            stock(
                "S001",
                FLOW,
                41,
                local(D, 7, 30),
                [
                    ("L-EXPIRED", 2, D),  # expires today: must leave the shelf, not be promoted
                    ("L-TOMORROW", 3, D + timedelta(days=1)),
                    ("L-90", 5, D + timedelta(days=90)),  # last day of the 90-day window
                    ("L-91", 7, D + timedelta(days=91)),
                    ("L-EMPTY", 0, D + timedelta(days=10)),
                    ("L-FRESH", 24, D + timedelta(days=400)),
                ],
            ),
            stock(
                "S001",
                COLD,
                12,
                local(D, 7, 30),
                [("C-60", 4, D + timedelta(days=60)), ("C-61", 8, D + timedelta(days=61))],
            ),
            stock("S002", FLOW, 6, local(D, 7, 30), [("S2-FRESH", 6, D + timedelta(days=200))]),
        ],
    )
    report = evaluate(chain, "expiry_watch")
    assert report.evaluated == 3
    flow, cold = promotions_of(chain)
    assert (flow.sku, flow.template_id, flow.kind, flow.limit_units) == (FLOW, "near_expiry", "percent_off", Decimal(8))
    assert [lot["lot"] for lot in flow.evidence["lots"]] == ["L-TOMORROW", "L-90"]
    assert [lot["days_left"] for lot in flow.evidence["lots"]] == [1, 90]
    assert [lot["lot"] for lot in flow.evidence["expired_lots"]] == ["L-EXPIRED"]
    assert flow.title["zh-CN"] == "参松养心胶囊 临期特惠 减30%（限8件）"
    # Cold medicine has a 60-day window in the rule file.
    assert (cold.sku, cold.limit_units, cold.evidence["window_days"]) == (COLD, Decimal(4), 60)
    assert [lot["lot"] for lot in cold.evidence["lots"]] == ["C-60"]
    assert evaluate(chain, "expiry_watch").raised == []


def test_stockout_forecast_alerts_the_manager_when_cover_is_below_lead_time(chain: Engine) -> None:
    add_master_data(chain)
    week = [sold("S001", FLOW, local(D - timedelta(days=i), 11), 2) for i in range(7)]  # 2 a day
    ingest(chain, [*week, stock("S001", FLOW, 9, local(D, 7, 30))])  # 4.5 days of cover < 5 days lead time
    report = evaluate(chain, "stockout_forecast")
    assert len(report.raised) == 1
    with session_scope(chain) as session:
        alert = session.scalars(select(Alert)).one()
        assert (alert.level, alert.subject, alert.values["days_of_cover"], alert.values["lead_time_days"]) == (
            "store", FLOW, 4.5, 5,
        )  # fmt: skip
        assert "仅够 4.5 天" in alert.summary["zh-CN"]
    assert promotions_of(chain) == []  # an alert, not a draft
    # Restocked to 10 units = 5 days of cover: the alert resolves itself.
    ingest(chain, [stock("S001", FLOW, 10, local(D, 18))])
    assert evaluate(chain, "stockout_forecast").resolved == 1


def approve_draft(engine: Engine, now: datetime = CLOSING, **kwargs: Any) -> Promotion:
    stock_watch_scenario(engine)
    evaluate(engine, "stock_watch")
    (draft,) = promotions_of(engine)
    with session_scope(engine) as session:
        approved = service.approve(
            session=session, promotion_id=draft.promotion_id, user_id="mgr-s001", now=now, **kwargs
        )
        session.expunge(approved)
    return approved


def test_approval_with_edited_parameters_publishes_a_new_set_and_is_audited(chain: Engine) -> None:
    with pytest.raises(service.PromotionError, match=r"params.percent: 50 is outside the template's bounds \[0, 30\]"):
        approve_draft(chain, params={"percent": 50})
    with session_scope(chain) as session:
        draft = session.scalars(select(Promotion)).one()
        assert draft.status == PENDING  # a refused edit changes nothing
        approved = service.approve(
            session=session, promotion_id=draft.promotion_id, user_id="mgr-s001", params={"percent": 20}, now=CLOSING
        )
        assert approved.status == ACTIVE
        assert approved.params == {"min_qty": 2, "gift_qty": 1, "percent": 20}
        assert approved.title["zh-CN"] == "参松养心胶囊 清仓特惠：满2件减20%，赠医用外科口罩×1"
        assert approved.ends_at == CLOSING.astimezone(UTC) + timedelta(days=7)
        logged = audit.entries(session=session, actions=["promotion_approved"])
        assert [(e.actor, e.target, e.detail["store_id"]) for e in logged] == [
            ("mgr-s001", approved.promotion_id, "S001")
        ]
        trail = service.audit_trail(session=session, promotion=approved)
        assert [(a.action, a.actor) for a in trail] == [("drafted", "system"), ("approved", "mgr-s001")]
        assert trail[1].detail["params_before"]["percent"] == 10 and trail[1].detail["params_after"]["percent"] == 20
        assert session.get(Alert, approved.alert_id).status == RESOLVED  # type: ignore[union-attr]
        current = service.current_set(session=session, store_id="S001")
        assert current["version"] == 1
        assert [p["promotion_id"] for p in current["promotions"]] == [approved.promotion_id]
        assert service.current_set(session=session, store_id="S002") == {
            "store_id": "S002", "version": 0, "generated_at": None, "promotions": [],
        }  # fmt: skip
        with pytest.raises(service.PromotionError, match="is active; only a pending one can be approved"):
            service.approve(session=session, promotion_id=draft.promotion_id, user_id="hq-1", now=CLOSING)


def test_reject_needs_a_reason_and_retract_and_end_publish_new_versions(chain: Engine) -> None:
    approved = approve_draft(chain)
    with session_scope(chain) as session:
        with pytest.raises(service.PromotionError, match="reason: a rejection needs a reason"):
            service.reject(session=session, promotion_id=approved.promotion_id, user_id="mgr-s001", reason=" ")
        with pytest.raises(service.PromotionError, match="only a pending one can be rejected"):
            service.reject(session=session, promotion_id=approved.promotion_id, user_id="mgr-s001", reason="no")
        service.retract(
            session=session, promotion_id=approved.promotion_id, user_id="hq-1", reason="厂家召回", now=CLOSING
        )
        assert service.current_set(session=session, store_id="S001")["version"] == 2
        assert service.current_set(session=session, store_id="S001")["promotions"] == []
        assert session.get(Promotion, approved.id).status == RETRACTED  # type: ignore[union-attr]


def test_undecided_drafts_expire_and_active_promotions_end(chain: Engine) -> None:
    approved = approve_draft(chain)
    add_expiring = [stock("S002", FLOW, 6, local(D, 8), [("X", 6, D + timedelta(days=30))])]
    ingest(chain, add_expiring)
    evaluate(chain, "expiry_watch")
    with session_scope(chain) as session:
        pending = session.scalars(select(Promotion).where(Promotion.status == PENDING)).one()
        assert pending.decide_by == CLOSING.astimezone(UTC) + timedelta(hours=48)
        early = service.expire_due(session=session, now=CLOSING + timedelta(hours=47))
        assert (early.expired, early.ended) == ([], [])
        done = service.expire_due(session=session, now=CLOSING + timedelta(days=8))
        assert done.expired == [pending.promotion_id]
        assert done.ended == [approved.promotion_id]
        assert session.get(Promotion, pending.id).status == EXPIRED  # type: ignore[union-attr]
        assert session.get(Promotion, approved.id).status == ENDED  # type: ignore[union-attr]
        assert session.get(Alert, pending.alert_id).status == RESOLVED  # type: ignore[union-attr]
        assert service.current_set(session=session, store_id="S001")["version"] == 2
        with pytest.raises(service.PromotionError, match="is expired; only a pending one"):
            service.approve(session=session, promotion_id=pending.promotion_id, user_id="mgr-s002")


def test_execution_rate_of_a_hand_built_day_is_exact(chain: Engine) -> None:
    approved = approve_draft(chain, now=local(D + timedelta(days=1), 8))
    pid = approved.promotion_id
    day = D + timedelta(days=1)
    ingest(
        chain,
        [
            # 8 eligible sale lines while active, 5 of them carrying the promotion: 62.5 %
            *[sold("S001", FLOW, local(day, 9 + i), 2, promotion_id=pid, n=i) for i in range(5)],
            *[sold("S001", FLOW, local(day, 15 + i), 1, n=i) for i in range(3)],
            sold("S001", FLOW, local(day, 7), 1, n=9),  # before the approval: not counted
            sold("S001", FLOW, local(day, 19), 1, kind="return", n=8),  # a return: not a sale line
            sold("S001", COLD, local(day, 12), 1, n=7),  # not eligible
            sold("S002", FLOW, local(day, 12), 1, n=6),  # another store
        ],
    )
    with session_scope(chain) as session:
        promotion = service.get_promotion(session=session, promotion_id=pid)
        rate = service.execution(session=session, promotion=promotion, until=local(day + timedelta(days=1), 0))
        assert (rate.ratio.numerator, rate.ratio.denominator) == (5, 8)
        assert rate.ratio.percent == pytest.approx(62.5)
        by_store = service.execution_by_store(
            session=session, since=local(day, 0), until=local(day + timedelta(days=1), 0)
        )
        assert {store: (r.numerator, r.denominator) for store, r in by_store.items()} == {"S001": (5, 8)}
        # A day before the approval has no promotion running: no rate, not 0 %.
        assert service.execution_by_store(session=session, since=local(D, 0), until=local(day, 0)) == {}


def test_tills_that_never_acknowledged_and_each_tills_delivered_version(chain: Engine) -> None:
    approved = approve_draft(chain)
    with session_scope(chain) as session:
        record_promotion_ack(session=session, store_id="S001", terminal_id="T1", version=1, source="test")
        assert not record_promotion_ack(session=session, store_id="S001", terminal_id="T1", version=1, source="test")
        promotion = service.get_promotion(session=session, promotion_id=approved.promotion_id)
        assert service.tills_never_acknowledged(session=session, promotion=promotion) == ["T2", "T3"]
        delivered = {
            t.terminal_id: t.delivered_version for t in service.till_deliveries(session=session, store_id="S001")
        }
        assert delivered == {"T1": 1, "T2": None, "T3": None}


def test_safety_stock_imports_from_csv_with_a_chain_wide_row(chain: Engine, tmp_path: Any) -> None:
    add_master_data(chain)
    path = tmp_path / "safety_stock.csv"
    path.write_text(
        f"store_id,sku,safety_stock,lead_time_days\n*,{COLD},12,3\nS002,{COLD},20,\nS009,{COLD},1,1\nS001,{COLD},-1,2\n",
        "utf-8",
    )
    with session_scope(chain) as session:
        (report,) = import_file(path, session=session)
        assert not report.written
        assert [str(e) for e in report.errors] == [
            "line 5: safety_stock: must be a number ≥ 0",
            "line 4: store_id: unknown store 'S009'",
        ]
    path.write_text(f"store_id,sku,safety_stock,lead_time_days\n*,{COLD},12,3\nS002,{COLD},20,\n", "utf-8")
    with session_scope(chain) as session:
        (report,) = import_file(path, session=session)
        assert (report.inserted, report.written) == (2, True)
        from store_rules.stock import safety_levels

        assert safety_levels(session=session, store_id="S002")[COLD] == (Decimal(20), 7)
        assert safety_levels(session=session, store_id="S003")[COLD] == (Decimal(12), 3)


def test_templates_and_rules_refuse_bad_references_with_the_line(chain: Engine, tmp_path: Any) -> None:
    bad = (TEMPLATES_DIR / "near_expiry.yaml").read_text("utf-8").replace("max: 50", "max: 5")
    with pytest.raises(RuleDefinitionError, match=r"t.yaml:\d+: params.percent: expected min ≤ default ≤ max"):
        parse_template(bad, "t.yaml")
    with pytest.raises(RuleDefinitionError, match=r"unknown placeholder \{discount\}"):
        parse_template(bad.replace("max: 5", "max: 50").replace("{percent}%（", "{discount}%（"), "t.yaml")
    rules = tmp_path / "rules"
    rules.mkdir()
    text = (TEMPLATES_DIR.parent / "rules" / "stock_watch.yaml").read_text("utf-8")
    (rules / "stock_watch.yaml").write_text(text.replace("template: clearance_gift", "template: flash_sale"), "utf-8")
    with (
        session_scope(chain) as session,
        pytest.raises(RuleDefinitionError, match="no promotion template 'flash_sale'"),
    ):
        load_templates_and_rules(session=session, rules_dir=rules)
    assert parse_rule(text).type == "stock_watch"


def test_concurrent_drafts_for_the_same_store_sku_and_template_leave_one(chain: Engine) -> None:
    add_master_data(chain)
    with session_scope(chain) as session:
        from ingest.models import Store
        from store_rules.promotions.templates import stored_template

        store = session.get(Store, "S001")
        template = stored_template(session=session, template_id="near_expiry")
        assert store is not None and template is not None
        first = service.draft(session=session, store=store, sku=FLOW, template=template, evidence={}, now=CLOSING)
        second = service.draft(session=session, store=store, sku=FLOW, template=template, evidence={}, now=CLOSING)
        assert first is not None and second is None
        # A draft for another template of the same SKU is a different promotion.
        other = stored_template(session=session, template_id="amount_off")
        assert other is not None
        assert service.draft(session=session, store=store, sku=FLOW, template=other, evidence={}, now=CLOSING)
