"""A deterministic simulator of a pharmacy chain's contract events (CONTRACT.md, v1).

`simulate_day` builds one store's business day from a `random.Random` seeded with the store
and the date, so the same day always yields the same events with the same ids: loading a
day twice stores duplicates, never new events. The day follows a pharmacy's rhythm: open
08:00-22:00 local time, a morning and an evening peak, footfall per door sensor every
15 minutes, 20-40 % of visitors buying, 1-5 lines per receipt, a few returns, the five-step
counter flow for every sale with a flow-controlled SKU, a scan-time prompt answer when a
prompt-triggering SKU (参松养心胶囊) is sold, and a stock snapshot per SKU before opening.

`LiveFeed` produces an accelerated trickle "now" for the demo: a receipt every few seconds
for a few stores and 15-second footfall counts scaled to the store's conversion. Sales that
fall on a POS-driven till are handed to `seeds.pos_till.PosTill` instead, which rings them up
through the POS API (scan, prompts, the five steps, the checkout gate).

`load_history` writes days of history through `ingest.service.ingest_payloads`, one
store-day per call, exactly like any other source.
"""

from __future__ import annotations

import bisect
import csv
import itertools
import math
import random
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Engine

from ingest.contract import STEPS
from ingest.db import session_scope
from ingest.service import ingest_payloads

Event = dict[str, Any]

DEMO_CHAIN_DIR = Path(__file__).parent / "demo_chain"
SEED = "storepulse-demo"
OPEN_HOUR = 8
CLOSE_HOUR = 22
SLOT = timedelta(minutes=15)
STOCK_SNAPSHOT_AT = (7, 30)  # local time of the daily stock snapshot, before opening
PROMPT_ID = "recommendation_source"
PROMPT_ANSWERS = (("doctor", 50), ("referral", 30), ("poster", 20))  # 医生推荐 / 老客转介 / 海报引导
PROMPT_ANSWER_VALUES = [answer for answer, _ in PROMPT_ANSWERS]
PROMPT_MIX: tuple[int, ...] = tuple(weight for _, weight in PROMPT_ANSWERS)

# Relative traffic per local hour: a pharmacy peaks in the morning and after work.
HOURLY_TRAFFIC: dict[int, float] = {
    8: 4, 9: 7, 10: 8, 11: 7, 12: 5, 13: 4, 14: 4, 15: 5, 16: 6, 17: 8, 18: 10, 19: 9, 20: 6, 21: 3,
}  # fmt: skip
WEEKDAY_FACTOR = (1.05, 1.0, 0.97, 1.0, 1.03, 1.12, 1.08)  # Monday .. Sunday

# How often a category is bought, relative to the others.
CATEGORY_WEIGHT: dict[str, float] = {
    "cold": 10, "pain": 8, "cough": 7, "digestive": 6, "vitamins": 5, "devices": 6, "allergy": 4,
    "tcm": 4, "cardio": 5, "antibiotic": 4, "diabetes": 3,
}  # fmt: skip
SKU_WEIGHT_OVERRIDE: dict[str, float] = {
    "6901234567890": 2.2,  # 参松养心胶囊: the chain's flagship cardio product
}

SYMPTOM_KEYWORDS: dict[str, tuple[str, ...]] = {
    "cardio": ("胸闷", "心悸", "气短", "头晕", "乏力", "失眠"),
    "antibiotic": ("咳嗽", "发热", "咽痛", "咳痰", "流涕"),
    "cough": ("咳嗽", "咳痰", "咽痒", "咽痛"),
    "diabetes": ("口渴", "多尿", "乏力", "血糖偏高"),
}
SYMPTOM_DURATION = ("，持续约三天", "，一周左右", "，反复发作一个月", "，近两天加重", "，慢病复诊")
GUIDANCE: dict[str, tuple[str, ...]] = {
    "cardio": ("每日3次，每次4粒，饭后温水送服；胸痛加重请立即就医", "按时服药，监测血压心率，忌烟酒"),
    "antibiotic": ("按疗程足量服用，不可自行停药；服药期间忌酒", "饭后服用，如出现皮疹立即停药并就医"),
    "cough": ("每日3次，每次2片，服药期间忌辛辣", "多饮温水，症状3天无好转请就医"),
    "diabetes": ("随餐服用，定期监测血糖", "注意低血糖反应，随身携带糖果"),
}
# Skip reasons are the listed ones of seeds/config/counter_flow.yaml (by their zh-CN label), free
# text only as "other: …": the POS API refuses anything else.
SKIP_REASONS: dict[str, tuple[str, ...]] = {
    "consultation": ("顾客拒绝",),
    "symptoms": ("顾客拒绝", "复购老方"),
    "recommendation": ("复购老方", "other: 医生处方指定"),
    "insurance_check": ("自费不走医保",),
    "guidance": ("复购老方", "other: 顾客赶时间"),
}
# Probability that a step is skipped, before the store's diligence factor.
SKIP_RATE: dict[str, float] = {
    "consultation": 0.02, "symptoms": 0.10, "recommendation": 0.04, "insurance_check": 0.08, "guidance": 0.07,
}  # fmt: skip
INSURANCE_FAIL_REASONS = (
    "医保卡已过期", "处方信息不完整", "非本统筹区参保", "超出门诊统筹限额", "人证不符", "医保系统超时",
)  # fmt: skip
SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗高郑梁谢宋唐许韩冯"


# --- the chain ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SkuInfo:
    sku: str
    name_zh: str
    category: str
    unit_price: Decimal
    is_rx: bool
    flow_controlled: bool
    prompt_triggering: bool
    insurance_eligible: bool
    weight: float


@dataclass(frozen=True)
class StaffInfo:
    staff_id: str
    name: str
    role: str


@dataclass(frozen=True)
class MemberInfo:
    member_id: str
    name: str
    home_store_id: str | None


@dataclass(frozen=True)
class StoreInfo:
    store_id: str
    name_zh: str
    region_id: str
    timezone: str
    terminals: tuple[str, ...]
    sensors: tuple[str, ...]
    staff: tuple[StaffInfo, ...]

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


@dataclass(frozen=True)
class Profile:
    """How a store behaves: traffic, conversion, insurance pass rate, counter-flow diligence."""

    visitors: int  # footfall `in` on an ordinary day
    conversion: float  # sale receipts / visitors
    insurance_pass: float  # pass / (pass + fail)
    skip_factor: float = 1.0  # multiplies SKIP_RATE: > 1 means a sloppier counter flow
    # How staff answer 推荐话术来源 (doctor / referral / poster), relative weights.
    prompt_mix: tuple[int, ...] = PROMPT_MIX


PROFILES: dict[str, Profile] = {
    # 温州鹿城店: busy, but insurance verification fails far too often (the pass-rate watch fires).
    # Its staff also lean on the poster rather than on the doctor's recommendation.
    "S001": Profile(560, 0.27, 0.55, 1.8, prompt_mix=(32, 23, 45)),
    "S002": Profile(720, 0.31, 0.90, 0.8),
    "S003": Profile(480, 0.29, 0.86, 1.0),
    "S004": Profile(420, 0.25, 0.82, 1.2),
    "S005": Profile(780, 0.33, 0.92, 0.6),
    "S006": Profile(650, 0.30, 0.88, 0.9),
    "S007": Profile(600, 0.35, 0.91, 0.7),
    "S008": Profile(450, 0.26, 0.84, 1.1),
    "S009": Profile(700, 0.32, 0.89, 0.8),
    "S010": Profile(620, 0.28, 0.87, 1.0),
    "S011": Profile(380, 0.24, 0.80, 1.3),
    "S012": Profile(400, 0.27, 0.83, 1.0),
}


def profile_of(store_id: str) -> Profile:
    """The demo stores' profiles; any other store gets a plausible one derived from its id."""
    if store_id in PROFILES:
        return PROFILES[store_id]
    rng = random.Random(f"profile:{store_id}")
    return Profile(rng.randint(350, 750), rng.uniform(0.24, 0.34), rng.uniform(0.80, 0.92), rng.uniform(0.7, 1.3))


@dataclass(frozen=True)
class Chain:
    stores: tuple[StoreInfo, ...]
    skus: tuple[SkuInfo, ...]
    members: tuple[MemberInfo, ...]
    _by_id: dict[str, StoreInfo] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_id.update({store.store_id: store for store in self.stores})

    def store(self, store_id: str) -> StoreInfo:
        try:
            return self._by_id[store_id]
        except KeyError:
            raise KeyError(f"unknown store {store_id!r}") from None

    def members_of(self, store_id: str) -> list[MemberInfo]:
        return [m for m in self.members if m.home_store_id == store_id]


def _read(directory: Path, name: str) -> list[dict[str, str]]:
    with (directory / f"{name}.csv").open(encoding="utf-8-sig", newline="") as fh:
        return list(csv.DictReader(fh))


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "y", "是", "t", "x")


def load_chain(directory: Path = DEMO_CHAIN_DIR) -> Chain:
    """Read the master-data CSVs (the same files `ingest.masterdata.import_file` imports)."""
    terminals: dict[str, list[str]] = {}
    for row in _read(directory, "terminals"):
        terminals.setdefault(row["store_id"], []).append(row["terminal_id"])
    sensors: dict[str, list[str]] = {}
    for row in _read(directory, "sensors"):
        sensors.setdefault(row["store_id"], []).append(row["sensor_id"])
    staff: dict[str, list[StaffInfo]] = {}
    for row in _read(directory, "staff"):
        staff.setdefault(row["store_id"], []).append(StaffInfo(row["staff_id"], row["name"], row["role"]))
    stores = tuple(
        StoreInfo(
            store_id=row["store_id"],
            name_zh=row["name_zh"],
            region_id=row["region_id"],
            timezone=row.get("timezone") or "Asia/Shanghai",
            terminals=tuple(terminals.get(row["store_id"], ["T1"])),
            sensors=tuple(sensors.get(row["store_id"], ["door-1"])),
            staff=tuple(staff.get(row["store_id"], ())),
        )
        for row in _read(directory, "stores")
        if _flag(row.get("active") or "true")
    )
    skus = []
    for row in _read(directory, "skus"):
        price = Decimal(row["unit_price"] or "10.00")
        weight = CATEGORY_WEIGHT.get(row["category"], 3.0) / (1.0 + float(price) / 60.0)
        if _flag(row["is_rx"]):
            weight *= 0.4
        weight *= random.Random(f"sku:{row['sku']}").uniform(0.6, 1.4)
        weight = SKU_WEIGHT_OVERRIDE.get(row["sku"], 1.0) * weight
        skus.append(
            SkuInfo(
                sku=row["sku"],
                name_zh=row["name_zh"],
                category=row["category"],
                unit_price=price,
                is_rx=_flag(row["is_rx"]),
                flow_controlled=_flag(row["flow_controlled"]),
                prompt_triggering=_flag(row["prompt_triggering"]),
                insurance_eligible=_flag(row["insurance_eligible"]),
                weight=weight,
            )
        )
    members = tuple(
        MemberInfo(row["member_id"], row["name"], row.get("home_store_id") or None)
        for row in _read(directory, "members")
    )
    return Chain(stores=stores, skus=tuple(skus), members=members)


# --- building blocks ---------------------------------------------------------------------


def rfc3339(at: datetime) -> str:
    return at.isoformat(timespec="seconds")


def money(value: Decimal) -> str:
    return f"{value:.2f}"


def _count(rng: random.Random, expected: float) -> int:
    """A Poisson-like count (normal approximation, good enough for footfall)."""
    if expected <= 0:
        return 0
    if expected < 10:
        # Knuth's method: exact Poisson for small means.
        limit, k, p = math.exp(-expected), 0, 1.0
        while True:
            p *= rng.random()
            if p <= limit:
                return k
            k += 1
    return max(0, round(rng.gauss(expected, math.sqrt(expected))))


def _sensor_shares(sensors: Sequence[str]) -> list[float]:
    if len(sensors) == 1:
        return [1.0]
    main = 0.7
    rest = (1.0 - main) / (len(sensors) - 1)
    return [main] + [rest] * (len(sensors) - 1)


def _split(rng: random.Random, total: int, shares: Sequence[float]) -> list[int]:
    """Spread ``total`` visitors over the sensors, each visitor drawn on its own."""
    if len(shares) == 1:
        return [total]
    bounds = list(itertools.accumulate(shares))
    counts = [0] * len(shares)
    for _ in range(total):
        counts[min(bisect.bisect(bounds, rng.random() * bounds[-1]), len(shares) - 1)] += 1
    return counts


@dataclass
class PlannedConsultation:
    pharmacist: StaffInfo | None
    customer: dict[str, Any]
    skips: dict[str, str]
    insurance: str | None = None  # "pass" / "fail", decided once the day's checks are known


@dataclass
class Sale:
    at: datetime
    kind: str
    terminal: str
    staff: StaffInfo | None
    member: MemberInfo | None
    lines: list[tuple[SkuInfo, int]]
    consultation: PlannedConsultation | None = None
    receipt_id: str = ""


class StoreCounter:
    """Draws baskets, customers and counter flows for one store."""

    def __init__(self, chain: Chain, store: StoreInfo, rng: random.Random) -> None:
        self.chain = chain
        self.store = store
        self.profile = profile_of(store.store_id)
        self.rng = rng
        self.skus = list(chain.skus)
        self.sku_cum_weights = list(itertools.accumulate(s.weight for s in self.skus))
        self.home_members = chain.members_of(store.store_id) or list(chain.members)
        self.all_members = list(chain.members)
        cashiers = [s for s in store.staff if s.role in ("cashier", "pharmacist")]
        self.cashiers = cashiers or list(store.staff)
        pharmacists = [s for s in store.staff if s.role == "pharmacist"]
        self.pharmacists = pharmacists or list(store.staff)
        self.terminal_weights = [max(1.0, 5.0 - 2 * i) for i in range(len(store.terminals))]

    def _member(self, probability: float) -> MemberInfo | None:
        if not self.all_members or self.rng.random() >= probability:
            return None
        pool = self.home_members if self.rng.random() < 0.85 else self.all_members
        return self.rng.choice(pool)

    def _basket(self) -> list[tuple[SkuInfo, int]]:
        size = self.rng.choices((1, 2, 3, 4, 5), weights=(38, 30, 18, 9, 5))[0]
        chosen: dict[str, tuple[SkuInfo, int]] = {}
        for _ in range(size * 3):
            if len(chosen) == size:
                break
            sku = self.rng.choices(self.skus, cum_weights=self.sku_cum_weights)[0]
            if sku.sku in chosen:
                continue
            qty = 1 if sku.unit_price > 50 else self.rng.choices((1, 2, 3, 4), weights=(76, 17, 5, 2))[0]
            chosen[sku.sku] = (sku, qty)
        return list(chosen.values())

    def sale(self, at: datetime) -> Sale:
        lines = self._basket()
        flow = any(sku.flow_controlled for sku, _ in lines)
        member = self._member(0.7 if flow else 0.45)
        sale = Sale(
            at=at,
            kind="sale",
            terminal=self.rng.choices(self.store.terminals, weights=self.terminal_weights)[0],
            staff=self.rng.choice(self.cashiers) if self.cashiers else None,
            member=member,
            lines=lines,
        )
        if flow:
            sale.consultation = self.plan_consultation(member)
            if sale.consultation.pharmacist is not None:
                sale.staff = sale.consultation.pharmacist
        return sale

    def refund(self, at: datetime) -> Sale:
        size = 1 if self.rng.random() < 0.8 else 2
        lines: dict[str, tuple[SkuInfo, int]] = {}
        while len(lines) < size:
            sku = self.rng.choices(self.skus, cum_weights=self.sku_cum_weights)[0]
            lines[sku.sku] = (sku, -1)
        return Sale(
            at=at,
            kind="return",
            terminal=self.store.terminals[0],
            staff=self.rng.choice(self.cashiers) if self.cashiers else None,
            member=self._member(0.5),
            lines=list(lines.values()),
        )

    def plan_consultation(self, member: MemberInfo | None) -> PlannedConsultation:
        """Who runs the five steps, for whom, and which steps get skipped (with a listed reason)."""
        if member is not None:
            customer: dict[str, Any] = {"member_id": member.member_id, "name": member.name}
        else:
            customer = {"member_id": None, "name": self.rng.choice(SURNAMES) + self.rng.choice(("先生", "女士"))}
        skips: dict[str, str] = {}
        for step in STEPS:
            if self.rng.random() < SKIP_RATE[step] * self.profile.skip_factor:
                skips[step] = self.rng.choice(SKIP_REASONS[step])
        return PlannedConsultation(
            pharmacist=self.rng.choice(self.pharmacists) if self.pharmacists else None,
            customer=customer,
            skips=skips,
        )

    def insurance_result(self) -> str:
        return "pass" if self.rng.random() < self.profile.insurance_pass else "fail"

    def prompt_answer(self, options: Sequence[str]) -> str:
        """One answer among ``options``, drawn with the store's usual mix (`Profile.prompt_mix`)."""
        mix = dict(zip(PROMPT_ANSWER_VALUES, self.profile.prompt_mix, strict=True))
        return self.rng.choices(list(options), weights=[mix.get(option, 10) for option in options])[0]

    # -- events -----------------------------------------------------------------------------

    def events(self, sale: Sale, consultation_id: str) -> list[Event]:
        store_id = self.store.store_id
        rng = self.rng
        events: list[Event] = []
        staff_id = sale.staff.staff_id if sale.staff else None
        flow_skus = [sku for sku, _ in sale.lines if sku.flow_controlled]
        consultation = sale.consultation
        if consultation is not None:
            at = sale.at - timedelta(seconds=rng.uniform(220, 480))  # five steps end before the scan
            category = flow_skus[0].category
            for number, step in enumerate(STEPS, start=1):
                at += timedelta(seconds=rng.uniform(15, 38))
                reason = consultation.skips.get(step)
                data: dict[str, Any] | None = None
                if reason is None:
                    data = self.step_data(step, category, [sku.sku for sku in flow_skus], consultation)
                events.append(
                    {
                        "type": "consultation_step",
                        "event_id": f"{consultation_id}-{number}",
                        "store_id": store_id,
                        "terminal_id": sale.terminal,
                        "consultation_id": consultation_id,
                        "occurred_at": rfc3339(at),
                        "staff_id": consultation.pharmacist.staff_id if consultation.pharmacist else staff_id,
                        "customer": consultation.customer,
                        "step": step,
                        "status": "skipped" if reason else "done",
                        "skip_reason": reason,
                        "data": data,
                    }
                )
        receipt = self.receipt_event(sale, consultation_id if consultation is not None else None)
        for line_no, (sku, _) in enumerate(sale.lines, start=1):
            if sale.kind == "sale" and sku.prompt_triggering:
                events.append(
                    {
                        "type": "prompt_answer",
                        "event_id": f"{receipt['event_id']}-P{line_no}",
                        "store_id": store_id,
                        "terminal_id": sale.terminal,
                        "receipt_id": sale.receipt_id,
                        "sku": sku.sku,
                        "prompt_id": PROMPT_ID,
                        "answer": self.prompt_answer(PROMPT_ANSWER_VALUES),
                        "occurred_at": rfc3339(sale.at - timedelta(seconds=rng.uniform(5, 40))),
                        "staff_id": staff_id,
                    }
                )
        events.append(receipt)
        return events

    def receipt_event(self, sale: Sale, consultation_id: str | None) -> Event:
        """The `receipt` event of a sale or return: lines at the master-data price, total = sum of amounts."""
        store_id = self.store.store_id
        lines = []
        total = Decimal("0.00")
        for line_no, (sku, qty) in enumerate(sale.lines, start=1):
            amount = (sku.unit_price * qty).quantize(Decimal("0.01"))
            total += amount
            lines.append(
                {
                    "line_no": line_no,
                    "sku": sku.sku,
                    "qty": qty,
                    "unit_price": money(sku.unit_price),
                    "amount": money(amount),
                    "promotion_id": None,
                }
            )
        return {
            "type": "receipt",
            "event_id": f"{store_id}-{sale.terminal}-{sale.receipt_id}",
            "store_id": store_id,
            "terminal_id": sale.terminal,
            "receipt_id": sale.receipt_id,
            "occurred_at": rfc3339(sale.at),
            "kind": sale.kind,
            "staff_id": sale.staff.staff_id if sale.staff else None,
            "member_id": sale.member.member_id if sale.member else None,
            "consultation_id": consultation_id,
            "lines": lines,
            "total": money(total),
        }

    def step_data(
        self, step: str, category: str, flow_skus: Sequence[str], consultation: PlannedConsultation
    ) -> dict[str, Any] | None:
        """What a `done` step carries: symptom keywords, the recommended SKUs, pass / fail, guidance."""
        rng = self.rng
        if step == "consultation":
            return {"text": rng.choice(("询问病史及过敏史", "询问既往用药", "了解症状与持续时间"))}
        if step == "symptoms":
            pool = SYMPTOM_KEYWORDS.get(category, SYMPTOM_KEYWORDS["cardio"])
            keywords = rng.sample(pool, rng.randint(1, min(3, len(pool))))
            return {"text": "、".join(keywords) + rng.choice(SYMPTOM_DURATION), "keywords": keywords}
        if step == "recommendation":
            return {"skus": list(flow_skus)}
        if step == "insurance_check":
            result = consultation.insurance or self.insurance_result()
            if result == "pass":
                return {"result": "pass"}
            return {"result": "fail", "reason": rng.choice(INSURANCE_FAIL_REASONS)}
        return {"text": rng.choice(GUIDANCE.get(category, GUIDANCE["cardio"]))}


# --- one store-day -----------------------------------------------------------------------


def _local_midnight(day: date, tz: ZoneInfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=tz)


def _slots(day: date, tz: ZoneInfo) -> list[datetime]:
    start = _local_midnight(day, tz)
    return [
        start + timedelta(hours=hour, minutes=15 * quarter)
        for hour in range(OPEN_HOUR, CLOSE_HOUR)
        for quarter in range(4)
    ]


def simulate_day(
    chain: Chain, store_id: str, day: date, *, until: datetime | None = None, seed: str = SEED
) -> list[Event]:
    """All events of one store's local business day, ordered by time; only those up to ``until``.

    A receipt comes with its consultation steps and prompt answers or not at all, and a
    footfall interval only once it is over, so a day cut at ``until`` has no half-done sales.
    """
    store = chain.store(store_id)
    tz = store.tz
    rng = random.Random(f"{seed}:{store_id}:{day.isoformat()}")
    profile = profile_of(store_id)
    counter = StoreCounter(chain, store, rng)
    stamp = f"{day:%Y%m%d}"
    events: list[Event] = []

    # Footfall per sensor per 15-minute slot.
    slots = _slots(day, tz)
    total_weight = sum(HOURLY_TRAFFIC.values()) * 4
    daily = profile.visitors * WEEKDAY_FACTOR[day.weekday()] * rng.uniform(0.92, 1.08)
    shares = _sensor_shares(store.sensors)
    ins: list[list[int]] = []
    for slot in slots:
        ins.append(_split(rng, _count(rng, daily * HOURLY_TRAFFIC[slot.hour] / total_weight), shares))
    inside = [0] * len(store.sensors)
    for index, slot in enumerate(slots):
        last = index == len(slots) - 1
        for sensor_index, sensor in enumerate(store.sensors):
            count_in = ins[index][sensor_index]
            inside[sensor_index] += count_in
            count_out = inside[sensor_index] if last else round(inside[sensor_index] * rng.uniform(0.55, 0.8))
            inside[sensor_index] -= count_out
            if until is not None and slot + SLOT > until:
                continue
            events.append(
                {
                    "type": "footfall",
                    "event_id": f"{store_id}-{sensor}-{slot:%Y%m%d%H%M}",
                    "store_id": store_id,
                    "sensor_id": sensor,
                    "occurred_at": rfc3339(slot),
                    "period_seconds": int(SLOT.total_seconds()),
                    "in": count_in,
                    "out": count_out,
                }
            )

    # Sales follow the visitors: the day's receipts = visitors x the day's conversion.
    slot_visitors = [sum(counts) for counts in ins]
    visitors = sum(slot_visitors)
    conversion = profile.conversion + rng.uniform(-0.03, 0.03)
    sale_count = round(visitors * conversion)
    times: list[datetime] = []
    if visitors:
        for slot in rng.choices(slots, weights=slot_visitors, k=sale_count):
            times.append(slot + timedelta(seconds=rng.uniform(60, SLOT.total_seconds() + 240)))
    times.sort()
    refunds = sorted(
        rng.choice(slots) + timedelta(seconds=rng.uniform(0, SLOT.total_seconds()))
        for _ in range(_count(rng, sale_count * 0.015))
    )
    sales = [counter.sale(at) for at in times] + [counter.refund(at) for at in refunds]
    sales.sort(key=lambda s: s.at)
    for number, sale in enumerate(sales, start=1):
        sale.receipt_id = f"{stamp}-{number:04d}"

    # The day's insurance checks fail at the store's rate, give or take a few points.
    checks = [
        s.consultation for s in sales if s.consultation is not None and "insurance_check" not in s.consultation.skips
    ]
    pass_rate = min(1.0, max(0.0, profile.insurance_pass + rng.uniform(-0.04, 0.04)))
    failing = set(rng.sample(range(len(checks)), round(len(checks) * (1 - pass_rate))))
    for index, check in enumerate(checks):
        check.insurance = "fail" if index in failing else "pass"

    for number, sale in enumerate(sales, start=1):
        group = counter.events(sale, f"C-{store_id}-{stamp}-{number:04d}")
        if until is None or sale.at <= until:
            events.extend(group)

    events.extend(stock_snapshots(chain, store, day, until=until))
    events.sort(key=lambda e: e["occurred_at"])
    return events


# --- stock -------------------------------------------------------------------------------

_EPOCH = date(2020, 1, 1)


# Mean lines per basket and units per line of `StoreCounter._basket` (sizes 1–5 weighted
# 38/30/18/9/5; quantities 1–4 weighted 76/17/5/2 below 50 yuan, always 1 above).
MEAN_BASKET_LINES = 2.13
MEAN_LINE_QTY = 1.33


def expected_daily_units(chain: Chain, store: StoreInfo, sku: SkuInfo) -> float:
    """Units of `sku` the store sells on an average day, from its profile and the basket model."""
    profile = profile_of(store.store_id)
    share = sku.weight / sum(s.weight for s in chain.skus)
    per_line = 1.0 if sku.unit_price > 50 else MEAN_LINE_QTY
    return profile.visitors * profile.conversion * MEAN_BASKET_LINES * share * per_line


def stock_snapshots(chain: Chain, store: StoreInfo, day: date, *, until: datetime | None = None) -> list[Event]:
    """One snapshot per SKU before opening, with lots that arrive, sell down (oldest first) and age.

    Every (store, SKU) has a restock cycle: a delivery tops the shelf up to a level that covers
    the cycle with some margin, and the stock sells down at the SKU's expected daily units, so
    days of cover run from weeks after a delivery to a few days before the next one. A lot's
    number, size and expiry depend only on the store, the SKU and the cycle, so the same lot
    shows up day after day. About one pair in ten was stocked with short-dated goods and
    always has a lot expiring within 90 days.
    """
    at = _local_midnight(day, store.tz).replace(hour=STOCK_SNAPSHOT_AT[0], minute=STOCK_SNAPSHOT_AT[1])
    if until is not None and at > until:
        return []
    events = []
    day_number = (day - _EPOCH).days
    for sku in chain.skus:
        pair = random.Random(f"stock:{store.store_id}:{sku.sku}")
        near_expiry = pair.random() < 0.1
        interval = pair.randint(18, 30) if near_expiry else pair.randint(18, 45)
        phase = pair.randrange(interval)
        daily = max(expected_daily_units(chain, store, sku), 0.2)
        level = daily * interval * pair.uniform(1.08, 1.6)  # right after a delivery
        cycle, position = divmod(day_number + phase, interval)
        leftover = round(level - interval * daily)  # what the previous lot still held at the delivery
        sold = round(position * daily)
        quantities = {cycle: round(level) - leftover - max(0, sold - leftover), cycle - 1: max(0, leftover - sold)}
        lots: list[dict[str, Any]] = []
        for number in (cycle - 2, cycle - 1, cycle):
            arrived = _EPOCH + timedelta(days=number * interval - phase)
            lot_rng = random.Random(f"lot:{store.store_id}:{sku.sku}:{number}")
            shelf_days = 2 * interval + lot_rng.randint(40, 70) if near_expiry else lot_rng.randint(300, 1000)
            expires = arrived + timedelta(days=shelf_days)
            if expires <= day:
                continue
            qty = quantities.get(number, 0)
            if near_expiry and number < cycle:
                qty = max(qty, lot_rng.randint(2, 6))  # short-dated stock lingers on the shelf
            if qty <= 0:
                continue
            lots.append({"lot": f"B{arrived:%y%m%d}{number % 10}", "qty": qty, "expires_on": expires.isoformat()})
        events.append(
            {
                "type": "stock",
                "event_id": f"{store.store_id}-STK-{day:%Y%m%d}-{sku.sku}",
                "store_id": store.store_id,
                "occurred_at": rfc3339(at),
                "sku": sku.sku,
                "on_hand": sum(int(lot["qty"]) for lot in lots),
                "lots": lots,
            }
        )
    return events


# --- history -----------------------------------------------------------------------------


@dataclass
class HistoryReport:
    store_days: int = 0
    events: int = 0
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def history_days(days: int, today: date) -> list[date]:
    """The ``days`` complete days before ``today``, then today itself."""
    return [today - timedelta(days=offset) for offset in range(days, -1, -1)]


def load_history(
    engine: Engine,
    chain: Chain,
    *,
    days: int,
    now: datetime | None = None,
    store_ids: Iterable[str] | None = None,
    seed: str = SEED,
    include_today: bool = True,
) -> HistoryReport:
    """Write ``days`` full days of history plus today up to ``now``, one store-day per batch."""
    now = now or datetime.now(UTC)
    report = HistoryReport()
    started = time.perf_counter()
    wanted = list(store_ids) if store_ids is not None else [s.store_id for s in chain.stores]
    for store_id in wanted:
        store = chain.store(store_id)
        today = now.astimezone(store.tz).date()
        for day in history_days(days, today):
            if day == today and not include_today:
                continue
            events = simulate_day(chain, store_id, day, until=now if day == today else None, seed=seed)
            with session_scope(engine) as session:
                results = ingest_payloads(events, session=session, source="simulator", now=now)
            report.store_days += 1
            report.events += len(events)
            for result in results:
                if result.status == "accepted":
                    report.accepted += 1
                elif result.status == "duplicate":
                    report.duplicate += 1
                else:
                    report.rejected += 1
                    if len(report.errors) < 10:
                        report.errors.append(f"{result.event_id}: {result.error}")
    report.seconds = time.perf_counter() - started
    return report


# --- live --------------------------------------------------------------------------------


@dataclass
class _LiveStore:
    counter: StoreCounter
    next_receipt: datetime
    next_window: datetime
    seq: int = 0


@dataclass(frozen=True)
class PendingSale:
    """A sale of the live feed that falls on a POS-driven till: rung up through the POS API, not posted."""

    store_id: str
    sale: Sale
    consultation_id: str


class LiveFeed:
    """An accelerated trickle of events for "now", for a few stores.

    Every store gets a sale every ``receipt_every_s`` seconds on average (uniformly 40 % to
    160 % of it, so a page never waits long), and every ``footfall_every_s`` seconds a footfall
    count per sensor sized so that receipts / visitors stays at the store's conversion.
    Timestamps never run ahead of the ``now`` passed to `events_until`.

    Sales that land on a till of ``pos_terminals`` (store → terminal ids) are not turned into
    events: they wait in `take_pos_sales` for a `seeds.pos_till.PosTill` to ring them up
    through the POS API, so the store's conversion stays the same whichever till sells.
    """

    def __init__(
        self,
        chain: Chain,
        store_ids: Sequence[str],
        *,
        start: datetime,
        seed: str = SEED,
        receipt_every_s: float = 5.0,
        footfall_every_s: int = 15,
        pos_terminals: Mapping[str, Collection[str]] | None = None,
    ) -> None:
        self.chain = chain
        self.receipt_every_s = receipt_every_s
        self.footfall_every_s = footfall_every_s
        self.rng = random.Random(f"{seed}:live:{start.isoformat()}")
        # Receipt numbers carry the feed's start so two runs against one database never collide.
        self.tag = f"{int(start.timestamp()) % 100_000:05d}"
        self.pos_terminals = {store_id: frozenset(terminals) for store_id, terminals in (pos_terminals or {}).items()}
        self._pos_sales: list[PendingSale] = []
        self.stores: dict[str, _LiveStore] = {}
        for store_id in store_ids:
            store = chain.store(store_id)
            self.stores[store_id] = _LiveStore(
                counter=StoreCounter(chain, store, self.rng),
                next_receipt=start + timedelta(seconds=self._gap()),
                next_window=start,
            )

    def _gap(self) -> float:
        return self.receipt_every_s * self.rng.uniform(0.4, 1.6)

    def events_until(self, now: datetime) -> dict[str, list[Event]]:
        """Every event that happened up to ``now`` since the last call, per store."""
        out: dict[str, list[Event]] = {}
        for store_id, state in self.stores.items():
            counter = state.counter
            store = counter.store
            events: list[Event] = []
            while state.next_window + timedelta(seconds=self.footfall_every_s) <= now:
                window = state.next_window.astimezone(store.tz)
                expected = (self.footfall_every_s / self.receipt_every_s) / counter.profile.conversion
                counts = _split(self.rng, _count(self.rng, expected), _sensor_shares(store.sensors))
                for sensor, count_in in zip(store.sensors, counts, strict=True):
                    events.append(
                        {
                            "type": "footfall",
                            "event_id": f"{store_id}-{sensor}-L{window:%Y%m%d%H%M%S}",
                            "store_id": store_id,
                            "sensor_id": sensor,
                            "occurred_at": rfc3339(window),
                            "period_seconds": self.footfall_every_s,
                            "in": count_in,
                            "out": max(0, count_in + self.rng.randint(-1, 1)),
                        }
                    )
                state.next_window += timedelta(seconds=self.footfall_every_s)
            while state.next_receipt <= now:
                at = state.next_receipt.astimezone(store.tz).replace(microsecond=0)
                state.seq += 1
                sale = counter.sale(at)
                sale.receipt_id = f"{at:%Y%m%d}-L{self.tag}{state.seq:04d}"
                consultation_id = f"C-{store_id}-{sale.receipt_id}"
                if sale.terminal in self.pos_terminals.get(store_id, ()):
                    self._pos_sales.append(PendingSale(store_id, sale, consultation_id))
                else:
                    events.extend(counter.events(sale, consultation_id))
                state.next_receipt += timedelta(seconds=self._gap())
            if events:
                events.sort(key=lambda e: e["occurred_at"])
                out[store_id] = events
        return out

    def take_pos_sales(self) -> list[PendingSale]:
        """The sales for POS-driven tills drawn by `events_until` since the last call, oldest first."""
        pending, self._pos_sales = self._pos_sales, []
        return pending
