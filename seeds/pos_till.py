"""A till that rings sales up through the real POS API, with a store's device token.

For each sale it does what a pharmacy till does (CONTRACT.md, docs/demo.md):

1. scans every SKU (`POST /api/v1/pos/scan`) and answers each required prompt the scan
   returns (`POST /api/v1/pos/prompt-answers`), the answer drawn from the prompt's options
   with the store's usual mix (`Profile.prompt_mix`);
2. when a scan says the SKU is flow-controlled (its `flow` is not null), opens the sale's
   consultation and records the steps the scan lists as missing
   (`POST /api/v1/pos/consultations/{id}/steps`), each done with realistic data (symptom
   keywords, the recommended SKUs, insurance pass / fail at the store's rate, guidance) or
   skipped with a listed reason (`SKIP_REASONS`);
3. checks out (`POST /api/v1/pos/checkout`). Now and then the cashier tries too early, gets
   the 409, completes or skips (with a reason) each step it names and checks out again;
4. posts the `receipt` event, with the consultation_id, through `POST /api/v1/events`.

Every timestamp comes from the till's clock: the sale's actions are spread over the minutes
before the sale's own time (which the caller keeps at or before "now"), one after the other,
so a consultation's first contact always precedes its sale and nothing is in the future.
Given the same `random.Random`, the same sales and the same database, a till makes the same
calls with the same ids.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx

from seeds.simulator import (
    SKIP_REASONS,
    Chain,
    PlannedConsultation,
    Sale,
    SkuInfo,
    StoreCounter,
    rfc3339,
)

log = logging.getLogger(__name__)

# What a rushed cashier picks when a blocked checkout makes them skip a step after all.
RUSH_SKIP_REASONS: dict[str, tuple[str, ...]] = {
    "consultation": ("顾客拒绝", "other: 顾客赶时间"),
    "symptoms": ("顾客拒绝", "复购老方", "other: 顾客赶时间"),
    "recommendation": ("复购老方", "other: 医生处方指定"),
    "insurance_check": ("自费不走医保", "顾客拒绝"),
    "guidance": ("复购老方", "other: 顾客赶时间", "药师不在岗"),
}
EARLY_CHECKOUT_RATE = 0.08  # of flow-controlled sales, times the store's skip factor
COMPLETE_AFTER_BLOCK = 0.6  # a step named by the 409 is then done (else skipped with a reason)

# Seconds between a till's actions: (min, max).
SCAN_GAP = (2, 6)
PROMPT_GAP = (3, 9)
STEP_GAP = (15, 38)
CHECKOUT_GAP = (4, 15)


class PosError(RuntimeError):
    """The POS API answered what a till does not expect (a refused step, a rejected receipt ...)."""

    def __init__(self, action: str, response: httpx.Response) -> None:
        super().__init__(f"{action}: HTTP {response.status_code} {response.text[:300]}")
        self.status_code = response.status_code


@dataclass(frozen=True)
class BlockedCheckout:
    """A checkout the gate refused (409), then allowed once the steps it named were done or skipped."""

    store_id: str
    terminal_id: str
    receipt_id: str
    consultation_id: str
    missing: tuple[str, ...]
    completed: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]  # (step, reason)
    message: dict[str, str]

    def describe(self) -> str:
        then = [f"{step} done" for step in self.completed] + [
            f"{step} skipped ({reason})" for step, reason in self.skipped
        ]
        return (
            f"{self.store_id} {self.terminal_id} receipt {self.receipt_id}: checkout blocked "
            f"(missing {', '.join(self.missing)}), then {', '.join(then)}: allowed"
        )


@dataclass
class TillSale:
    """What one sale did at the till."""

    receipt_id: str
    at: datetime
    skus: list[str]
    consultation_id: str | None = None  # set once a scan said a SKU is flow-controlled
    controlled: list[str] = field(default_factory=list)
    prompt_answers: list[tuple[str, str, str]] = field(default_factory=list)  # (sku, prompt_id, answer)
    steps: list[tuple[str, str, str | None]] = field(default_factory=list)  # (step, status, skip reason)
    checkouts: list[int] = field(default_factory=list)  # HTTP status of each checkout attempt
    blocked: BlockedCheckout | None = None
    receipt_status: str = ""
    timestamps: list[datetime] = field(default_factory=list)  # every occurred_at sent, in order


# Share of scans of a promoted SKU where the cashier applies the promotion.
PROMOTION_APPLY_RATE = 0.65


class _Clock:
    """The till's clock for one sale: strictly increasing whole seconds."""

    def __init__(self, rng: random.Random, start: datetime) -> None:
        self.rng, self.at = rng, start

    def tick(self, gap: tuple[int, int]) -> datetime:
        self.at += timedelta(seconds=self.rng.randint(*gap))
        return self.at


class PosTill:
    """One till of one store, driving the POS API of a running StorePulse over HTTP."""

    def __init__(
        self,
        base_url: str,
        token: str,
        chain: Chain,
        store_id: str,
        terminal_id: str = "T1",
        *,
        rng: random.Random | None = None,
        early_checkout_rate: float | None = None,
        promotion_apply_rate: float = PROMOTION_APPLY_RATE,
        timeout: float = 10.0,
    ) -> None:
        self.store = chain.store(store_id)
        if terminal_id not in self.store.terminals:
            raise ValueError(f"terminal_id: {store_id} has no till {terminal_id!r} ({', '.join(self.store.terminals)})")
        self.chain = chain
        self.terminal_id = terminal_id
        self.rng = rng or random.Random(f"pos-till:{store_id}:{terminal_id}")
        self.counter = StoreCounter(chain, self.store, self.rng)
        self.skus = {sku.sku: sku for sku in chain.skus}
        skip_factor = self.counter.profile.skip_factor
        self.early_checkout_rate = (
            EARLY_CHECKOUT_RATE * skip_factor if early_checkout_rate is None else early_checkout_rate
        )
        self.promotion_apply_rate = promotion_apply_rate
        self.client = httpx.Client(
            base_url=base_url.rstrip("/"), headers={"Authorization": f"Bearer {token}"}, timeout=timeout
        )
        self.stats: Counter[str] = Counter()
        self._seq = 0

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> PosTill:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- HTTP -------------------------------------------------------------------------------

    def _post(self, action: str, path: str, body: dict[str, Any], expect: tuple[int, ...]) -> httpx.Response:
        response = self.client.post(
            path, json={"store_id": self.store.store_id, "terminal_id": self.terminal_id, **body}
        )
        if response.status_code not in expect:
            raise PosError(action, response)
        return response

    # -- sales ------------------------------------------------------------------------------

    def run(self, count: int, *, end: datetime, every_s: float = 240.0) -> list[TillSale]:
        """Draw and ring up ``count`` sales, the last one at ``end`` (keep it at or before now)."""
        end = end.astimezone(self.store.tz).replace(microsecond=0)
        tag = f"{int(end.timestamp()) % 100_000:05d}"
        times = [end]
        for _ in range(count - 1):
            times.append(times[-1] - timedelta(seconds=round(every_s * self.rng.uniform(0.5, 1.5))))
        sales = []
        for at in reversed(times):
            sale = self.counter.sale(at)
            self._seq += 1
            sale.receipt_id = f"{at:%Y%m%d}-{self.terminal_id}P{tag}{self._seq:04d}"
            sales.append(self.sell(sale, f"C-{self.store.store_id}-{sale.receipt_id}"))
        return sales

    def sell(self, sale: Sale, consultation_id: str) -> TillSale:
        """Ring up one drawn sale at this till; ``consultation_id`` is used if a scan asks for the flow."""
        if sale.kind != "sale":
            raise ValueError("kind: a PosTill rings up sales only")
        sale.terminal = self.terminal_id
        at = sale.at.astimezone(self.store.tz).replace(microsecond=0)
        # Start early enough for every action to fit before the sale's time: a scan and a prompt
        # per line, and for a planned consultation five steps and two checkout attempts.
        budget = len(sale.lines) * (SCAN_GAP[1] + PROMPT_GAP[1])
        if sale.consultation is not None:
            budget += 5 * STEP_GAP[1] + 2 * CHECKOUT_GAP[1]
        clock = _Clock(self.rng, at - timedelta(seconds=budget + self.rng.randint(10, 60)))
        done = TillSale(receipt_id=sale.receipt_id, at=at, skus=[sku.sku for sku, _ in sale.lines])
        staff_id = sale.staff.staff_id if sale.staff else None

        missing: list[str] = []
        applied: dict[str, str] = {}  # SKU → the promotion the cashier rang up with it
        for line_no, (sku, _qty) in enumerate(sale.lines, start=1):
            clock.tick(SCAN_GAP)
            scanned = self._post(
                "scan", "/api/v1/pos/scan",
                {"receipt_id": sale.receipt_id, "sku": sku.sku, "consultation_id": done.consultation_id},
                (200,),
            ).json()  # fmt: skip
            self.stats["scans"] += 1
            # Cashiers forget to ring up a promotion now and then: the gap the execution rate shows.
            if scanned["promotions"] and self.rng.random() < self.promotion_apply_rate:
                applied[sku.sku] = scanned["promotions"][0]["promotion_id"]
                self.stats["promotions_applied"] += 1
            for prompt in scanned["prompts"]:
                if prompt["required"]:
                    self._answer(done, clock, sale, line_no, sku, prompt, staff_id)
            if scanned["flow"] is not None:
                done.controlled.append(sku.sku)
                done.consultation_id = consultation_id  # the till opens the consultation at the first one
                missing = list(scanned["flow"]["missing"])

        plan: PlannedConsultation | None = None
        if done.consultation_id is not None:
            plan = sale.consultation or self.counter.plan_consultation(sale.member)
            if plan.pharmacist is not None:
                sale.staff = plan.pharmacist  # the pharmacist who ran the flow closes the sale
            early = self.rng.random() < self.early_checkout_rate and bool(missing)
            before = self.rng.randrange(len(missing)) if early else len(missing)
            for step in missing[:before]:
                self._step(done, clock, plan, step, plan.skips.get(step))
        self._checkout(done, clock, plan)
        if done.blocked is not None:
            log.info("%s", done.blocked.describe())
        receipt = self.counter.receipt_event(sale, done.consultation_id)
        for line in receipt["lines"]:
            line["promotion_id"] = applied.get(line["sku"])
        # Only when the server controls a SKU the chain does not flag can the steps outrun the
        # budget: the sale then closes just after them (still within the contract's 10 minutes).
        done.at = at = max(at, clock.at + timedelta(seconds=1))
        receipt["occurred_at"] = rfc3339(at)
        done.timestamps.append(at)
        response = self.client.post("/api/v1/events", json={"events": [receipt]})
        if response.status_code != 200:
            raise PosError("receipt", response)
        result = response.json()["results"][0]
        if result["status"] == "rejected":
            raise PosError(f"receipt {result['error']}", response)
        done.receipt_status = result["status"]
        self.stats["sales"] += 1
        self.stats["flow_sales"] += done.consultation_id is not None
        return done

    def _answer(
        self,
        done: TillSale,
        clock: _Clock,
        sale: Sale,
        line_no: int,
        sku: SkuInfo,
        prompt: dict[str, Any],
        staff_id: str | None,
    ) -> None:
        if prompt["input_type"] == "choice":
            answer = self.counter.prompt_answer([option["value"] for option in prompt["options"]])
        elif prompt["input_type"] == "number":
            answer = str(self.rng.randint(1, 3))
        else:
            answer = "顾客自述"
        at = clock.tick(PROMPT_GAP)
        self._post(
            "prompt answer", "/api/v1/pos/prompt-answers",
            {
                "receipt_id": sale.receipt_id, "sku": sku.sku, "prompt_id": prompt["prompt_id"], "answer": answer,
                "staff_id": staff_id, "occurred_at": rfc3339(at),
                "event_id": f"{self.store.store_id}-{self.terminal_id}-{sale.receipt_id}-P{line_no}",
            },
            (201,),
        )  # fmt: skip
        done.prompt_answers.append((sku.sku, prompt["prompt_id"], answer))
        done.timestamps.append(at)
        self.stats["prompt_answers"] += 1

    def _step(self, done: TillSale, clock: _Clock, plan: PlannedConsultation, step: str, reason: str | None) -> None:
        assert done.consultation_id is not None
        data = None
        if reason is None:
            category = self.skus[done.controlled[0]].category if done.controlled[0] in self.skus else "cardio"
            data = self.counter.step_data(step, category, done.controlled, plan)
        at = clock.tick(STEP_GAP)
        self._post(
            f"step {step}", f"/api/v1/pos/consultations/{done.consultation_id}/steps",
            {
                "step": step, "status": "skipped" if reason else "done", "skip_reason": reason, "data": data,
                "staff_id": plan.pharmacist.staff_id if plan.pharmacist else None, "customer": plan.customer,
                "occurred_at": rfc3339(at), "event_id": f"{done.consultation_id}-{len(done.steps) + 1}",
            },
            (201,),
        )  # fmt: skip
        done.steps.append((step, "skipped" if reason else "done", reason))
        done.timestamps.append(at)
        self.stats["steps_skipped" if reason else "steps_done"] += 1

    def _checkout(self, done: TillSale, clock: _Clock, plan: PlannedConsultation | None) -> None:
        body = {"receipt_id": done.receipt_id, "consultation_id": done.consultation_id, "skus": done.skus}
        for _attempt in range(2):
            clock.tick(CHECKOUT_GAP)
            response = self._post("checkout", "/api/v1/pos/checkout", body, (200, 409))
            done.checkouts.append(response.status_code)
            if response.status_code == 200:
                return
            refused = response.json()
            if plan is None or done.consultation_id is None:
                raise PosError("checkout refused a sale without a consultation", response)
            self.stats["blocked"] += 1
            missing = [item["step"] for item in refused["missing"]]
            completed, skipped = [], []
            for step in missing:
                reason = plan.skips.get(step)
                if reason is None and self.rng.random() >= COMPLETE_AFTER_BLOCK:
                    reason = self.rng.choice(RUSH_SKIP_REASONS.get(step, SKIP_REASONS[step]))
                self._step(done, clock, plan, step, reason)
                if reason is None:
                    completed.append(step)
                else:
                    skipped.append((step, reason))
            done.blocked = BlockedCheckout(
                store_id=self.store.store_id, terminal_id=self.terminal_id, receipt_id=done.receipt_id,
                consultation_id=done.consultation_id, missing=tuple(missing), completed=tuple(completed),
                skipped=tuple(skipped), message=refused["message"],
            )  # fmt: skip
        raise PosError("checkout still refused after completing the missing steps", response)
