"""The consultation state machine: one per consultation_id, pure (no database, no clock).

Steps arrive as records (from the POS API, MQTT or history). The latest record of a step
supersedes earlier ones (corrections keep both in the event store); a step counts as
recorded in order when every earlier required step was done or skipped before it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from store_rules.definitions import FlowDefinition

# A consultation runs minutes and its sale follows within minutes; late steps and corrections
# come within hours. Tills reuse consultation ids (a counter per till, reset on reinstall), so
# only steps within this window of an event belong to that event's consultation. The window also
# bounds every lookup of earlier steps in time, so TimescaleDB excludes every older daily chunk.
CONSULTATION_WINDOW = timedelta(days=2)


def consultation_window(at: datetime) -> tuple[datetime, datetime]:
    """The time range (inclusive) in which the steps of a consultation seen at `at` lie."""
    return at - CONSULTATION_WINDOW, at + CONSULTATION_WINDOW


@dataclass(frozen=True)
class StepRecord:
    step: str
    status: str  # done | skipped
    occurred_at: datetime
    staff_id: str | None = None
    skip_reason: str | None = None
    data: dict[str, Any] | None = None
    event_id: str | None = None


def _record_order(definition: FlowDefinition) -> Callable[[StepRecord], tuple[datetime, int, str]]:
    """Time first; steps stamped in the same instant (MQTT tills with coarse clocks) in flow order."""
    order = {step: index for index, step in enumerate(definition.required_steps)}

    def key(record: StepRecord) -> tuple[datetime, int, str]:
        return record.occurred_at, order.get(record.step, len(order)), record.event_id or ""

    return key


class StepRefused(ValueError):
    """A step the flow does not accept now; the message names what is missing."""


@dataclass
class Consultation:
    definition: FlowDefinition
    records: list[StepRecord] = field(default_factory=list)

    @classmethod
    def of(cls, definition: FlowDefinition, records: Iterable[StepRecord]) -> Consultation:
        return cls(definition, sorted(records, key=_record_order(definition)))

    @property
    def effective(self) -> dict[str, StepRecord]:
        """The latest record of each step: a correction supersedes the original."""
        latest: dict[str, StepRecord] = {}
        for record in self.records:
            latest[record.step] = record
        return latest

    @property
    def done(self) -> list[str]:
        effective = self.effective
        return [s for s in self.definition.required_steps if s in effective and effective[s].status == "done"]

    @property
    def skipped(self) -> list[str]:
        effective = self.effective
        return [s for s in self.definition.required_steps if s in effective and effective[s].status == "skipped"]

    @property
    def missing(self) -> list[str]:
        effective = self.effective
        return [s for s in self.definition.required_steps if s not in effective]

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def out_of_order(self) -> list[str]:
        """Steps first recorded while an earlier required step was still missing."""
        order = self.definition.required_steps
        seen: set[str] = set()
        late: list[str] = []
        for record in self.records:
            if record.step in order and record.step not in seen:
                earlier = order[: order.index(record.step)]
                if any(step not in seen for step in earlier):
                    late.append(record.step)
                seen.add(record.step)
        return late

    @property
    def first_contact(self) -> StepRecord | None:
        return self.records[0] if self.records else None

    def check_next(self, step: str, status: str, *, skip_reason: str | None, data: dict[str, Any] | None) -> None:
        """Raise StepRefused unless recording this step now keeps the flow in order."""
        definition = self.definition.step(step)
        if definition is None:
            raise StepRefused(f"step: {step!r} is not a step of the flow ({', '.join(self.definition.required_steps)})")
        order = self.definition.required_steps
        effective = self.effective
        missing_before = [s for s in order[: order.index(step)] if s not in effective]
        if missing_before:
            raise StepRefused(f"step: {missing_before[0]} must be done or skipped before {step}")
        if status == "skipped":
            problem = self.definition.skip_reason_problem(skip_reason)
        else:
            problem = definition.data_problem(data)
        if problem:
            raise StepRefused(problem)

    def record(self, record: StepRecord) -> None:
        self.records.append(record)
        self.records.sort(key=_record_order(self.definition))

    def status(self) -> dict[str, Any]:
        return {"done": self.done, "skipped": self.skipped, "missing": self.missing}
