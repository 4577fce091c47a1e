"""Rule and channel definitions: YAML under seeds/rules/, validated, versioned in the database.

One rule per file. Loading a file whose content changed stores a new version of that rule
(config kind ``rule:<id>``); the newest version is the one in force, and ``enabled: false``
keeps a rule as a draft that can be back-tested but never runs. ``channels.yaml`` lists the
notification channels and whom each reaches (kind ``channels``). A bad file is refused with
the line and the reason, and a load with any bad file stores nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from ingest import audit
from ingest.yaml_source import compose_yaml, line_of
from store_rules.definitions import Text, store_version
from store_rules.models import ConfigVersion

RULES_DIR = Path(__file__).resolve().parents[2] / "seeds" / "rules"
CHANNELS_FILE = "channels.yaml"
CHANNELS_KIND = "channels"
RULE_KIND_PREFIX = "rule:"

# Metrics a rule can watch: each is a per-store, per-business-day Ratio of store_rules.metrics.
METRICS = ("insurance_pass_rate", "step_completeness", "symptom_completeness", "traceability", "conversion_rate")
Metric = Literal["insurance_pass_rate", "step_completeness", "symptom_completeness", "traceability", "conversion_rate"]
Role = Literal["manager", "supervisor", "headquarters"]
Level = Literal["store", "region", "headquarters"]
LEVEL_ROLE: dict[str, str] = {"store": "manager", "region": "supervisor", "headquarters": "headquarters"}
NEXT_LEVEL: dict[str, str] = {"store": "region", "region": "headquarters"}


class RuleDefinitionError(ValueError):
    """A rule or channel file that cannot be used; the message names the file, line and reason."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Scope(Strict):
    """Where a rule applies: the whole chain, some regions or some stores."""

    chain: bool = False
    regions: list[str] = Field(default_factory=list)
    stores: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_kind(self) -> Scope:
        if sum([self.chain, bool(self.regions), bool(self.stores)]) != 1:
            raise ValueError("give exactly one of chain: true, regions: [...] or stores: [...]")
        return self


class Route(Strict):
    """Who receives the alert first, and when it climbs to the next level if nobody acknowledges."""

    level: Level
    role: Role | None = None
    escalate_after_hours: float | None = Field(default=24.0, gt=0)

    @model_validator(mode="after")
    def _role_fits_level(self) -> Route:
        expected = LEVEL_ROLE[self.level]
        if self.role is None:
            self.role = expected  # type: ignore[assignment]
        elif self.role != expected:
            raise ValueError(f"role {self.role!r} does not receive alerts at level {self.level!r} (use {expected!r})")
        return self


class ThresholdStreakParams(Strict):
    metric: Metric
    direction: Literal["below", "above"]
    threshold_percent: float = Field(ge=0, le=100)
    days: int = Field(ge=1, le=60, description="consecutive business days")
    min_denominator: int = Field(default=1, ge=1, description="a day with fewer cases has no value")
    evidence: Literal["none", "failed_insurance_checks"] = "none"
    evidence_days: int = Field(default=3, ge=1, le=31)


class ChangeParams(Strict):
    metric: Metric
    direction: Literal["drop", "rise", "either"]
    change_percent: float = Field(gt=0, description="relative change of the ratio against the previous period")
    period: Literal["day", "week", "month"]
    min_denominator: int = Field(default=1, ge=1)


class SilenceParams(Strict):
    source: Literal["footfall", "receipts", "consultation_steps", "stock"]
    days: int = Field(ge=1, le=60, description="business days without a single record")
    per: Literal["store", "sensor"] = "store"
    lookback_days: int = Field(default=30, ge=1, le=365)

    @model_validator(mode="after")
    def _sensor_needs_footfall(self) -> SilenceParams:
        if self.per == "sensor" and self.source != "footfall":
            raise ValueError("per: sensor only applies to source: footfall")
        return self


class DraftParams(Strict):
    """What a rule that drafts promotions fills: the template, and how long a refusal keeps it quiet."""

    template: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    cooldown_days: int = Field(
        default=7, ge=0, le=365, description="after a rejected or expired draft, no new one for this store × SKU"
    )


class StockWatchParams(DraftParams):
    growth_percent: float = Field(default=40, ge=0, description="last window's sales above the previous window's")
    window_days: int = Field(default=7, ge=1, le=60)
    min_previous_units: float = Field(default=1, gt=0, description="a window with fewer sales has no growth rate")


class ExpiryWatchParams(DraftParams):
    window_days: int = Field(default=90, ge=1, le=730, description="days before the expiry date a lot is at risk")
    category_window_days: dict[str, int] = Field(default_factory=dict, description="per SKU category")
    min_units: float = Field(default=1, gt=0, description="less at risk than this drafts nothing")


class StockoutForecastParams(Strict):
    sales_days: int = Field(default=7, ge=1, le=60, description="days of sales the daily rate is averaged over")
    default_lead_time_days: int = Field(default=3, ge=0, le=120, description="for SKUs without master data")


CADENCE = re.compile(r"^(\d+)(m|h)$")


class RuleBase(Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    name: Text
    description: str | None = None
    enabled: bool = True
    severity: Literal["low", "medium", "high", "critical"] = "medium"
    scope: Scope
    route: Route
    cadence: str = Field(default="15m", description="how often the scheduler evaluates it: 15m, 1h, ...")
    version: int = Field(default=0, exclude=True)

    @field_validator("cadence")
    @classmethod
    def _cadence(cls, value: str) -> str:
        match = CADENCE.match(value)
        if not match or int(match.group(1)) == 0:
            raise ValueError("expected minutes or hours, like 15m or 1h")
        return value

    @property
    def cadence_minutes(self) -> int:
        match = CADENCE.match(self.cadence)
        assert match is not None
        return int(match.group(1)) * (60 if match.group(2) == "h" else 1)


class ThresholdStreakRule(RuleBase):
    type: Literal["threshold_streak"]
    params: ThresholdStreakParams


class ChangeRule(RuleBase):
    type: Literal["change"]
    params: ChangeParams


class SilenceRule(RuleBase):
    type: Literal["silence"]
    params: SilenceParams


class StockWatchRule(RuleBase):
    type: Literal["stock_watch"]
    params: StockWatchParams


class ExpiryWatchRule(RuleBase):
    type: Literal["expiry_watch"]
    params: ExpiryWatchParams


class StockoutForecastRule(RuleBase):
    type: Literal["stockout_forecast"]
    params: StockoutForecastParams


AnyRule = ThresholdStreakRule | ChangeRule | SilenceRule | StockWatchRule | ExpiryWatchRule | StockoutForecastRule
StockRule = StockWatchRule | ExpiryWatchRule | StockoutForecastRule
RuleDefinition = Annotated[AnyRule, Field(discriminator="type")]
RULE_ADAPTER: TypeAdapter[AnyRule] = TypeAdapter(RuleDefinition)


class Audience(Strict):
    role: Role
    regions: list[str] = Field(default_factory=list)
    stores: list[str] = Field(default_factory=list)


class ChannelDefinition(Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    adapter: Literal["wecom", "dingtalk", "webhook", "email"]
    # Values may name environment variables as ${NAME}: secrets stay out of files and the database.
    config: dict[str, Any]
    audience: Audience
    rate_limit_per_minute: int = Field(default=20, ge=1)
    enabled: bool = True

    def reaches(self, *, level: str, store_id: str, region_id: str) -> bool:
        if not self.enabled or self.audience.role != LEVEL_ROLE[level]:
            return False
        if level == "headquarters":
            return True
        if self.audience.stores:
            return store_id in self.audience.stores
        if self.audience.regions:
            return region_id in self.audience.regions
        return True


class ChannelSet(Strict):
    channels: list[ChannelDefinition] = Field(default_factory=list)
    version: int = Field(default=0, exclude=True)

    @model_validator(mode="after")
    def _unique_ids(self) -> ChannelSet:
        seen: set[str] = set()
        for channel in self.channels:
            if channel.id in seen:
                raise ValueError(f"channel id {channel.id!r} appears twice")
            seen.add(channel.id)
        return self

    def routed(self, *, level: str, store_id: str, region_id: str) -> list[ChannelDefinition]:
        return [c for c in self.channels if c.reaches(level=level, store_id=store_id, region_id=region_id)]

    def get(self, channel_id: str) -> ChannelDefinition | None:
        return next((c for c in self.channels if c.id == channel_id), None)


# --- parsing with line numbers ------------------------------------------------------------


def validation_problems(exc: ValidationError, root: yaml.Node | None, source: str, tagged: bool) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        loc = list(error["loc"])
        if tagged and len(loc) > 1 and isinstance(loc[0], str) and loc[0] in _RULE_TYPES:
            loc = loc[1:]  # the discriminated union puts the rule type first
        if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc = ["type"]
        where = ".".join(str(p) for p in loc) or "file"
        line = line_of(root, loc)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "union_tag_invalid":
            message = f"unknown rule type; expected one of {', '.join(_RULE_TYPES)}"
        elif error["type"] == "union_tag_not_found":
            message = f"missing; expected one of {', '.join(_RULE_TYPES)}"
        lines.append(f"{source}:{line}: {where}: {message}" if line else f"{source}: {where}: {message}")
    return "; ".join(lines)


_RULE_TYPES = ("threshold_streak", "change", "silence", "stock_watch", "expiry_watch", "stockout_forecast")


M = TypeVar("M")


def parse_yaml_mapping(text: str, source: str, validate: Callable[[Any], M], what: str, *, tagged: bool = False) -> M:
    """One YAML mapping validated into a model; any problem names the file, line, field and reason."""
    content, root = compose_yaml(text, source, RuleDefinitionError)
    if not isinstance(content, dict):
        raise RuleDefinitionError(f"{source}:1: file: expected a mapping with the {what}'s fields")
    try:
        return validate(content)
    except ValidationError as exc:
        raise RuleDefinitionError(validation_problems(exc, root, source, tagged=tagged)) from None


def parse_rule(text: str, source: str = "<text>") -> AnyRule:
    return parse_yaml_mapping(text, source, RULE_ADAPTER.validate_python, "rule", tagged=True)


def parse_channels(text: str, source: str = "<text>") -> ChannelSet:
    content, root = compose_yaml(text, source, RuleDefinitionError)
    try:
        return ChannelSet.model_validate(content or {})
    except ValidationError as exc:
        raise RuleDefinitionError(validation_problems(exc, root, source, tagged=False)) from None


# --- versions in the database -------------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    kind: str
    version: int
    created: bool
    enabled: bool | None = None


def store_rule(*, session: Session, rule: AnyRule, source: str, actor: str = "system") -> LoadResult:
    kind = RULE_KIND_PREFIX + rule.id
    content = rule.model_dump(mode="json", by_alias=True)
    version, created = store_version(session=session, kind=kind, content=content, source=source)
    if created:
        audit.record(
            session=session, actor=actor, action="rule_changed", target=rule.id,
            detail={"version": version, "enabled": rule.enabled, "source": source},
        )  # fmt: skip
    return LoadResult(kind, version, created, rule.enabled)


def store_channels(*, session: Session, channels: ChannelSet, source: str) -> LoadResult:
    content = channels.model_dump(mode="json")
    version, created = store_version(session=session, kind=CHANNELS_KIND, content=content, source=source)
    return LoadResult(CHANNELS_KIND, version, created)


def load_rules_dir(
    *, session: Session, directory: Path = RULES_DIR, known_templates: set[str] | None = None
) -> list[LoadResult]:
    """Validate every file of the directory, then store the changed ones; a bad file stores nothing.

    With `known_templates`, a drafting rule that names another promotion template is a bad file.
    """
    rules: list[tuple[AnyRule, str]] = []
    channels: tuple[ChannelSet, str] | None = None
    errors = []
    ids: dict[str, str] = {}
    for path in sorted(directory.glob("*.yaml")):
        try:
            if path.name == CHANNELS_FILE:
                channels = (parse_channels(path.read_text("utf-8"), str(path)), str(path))
                continue
            rule = parse_rule(path.read_text("utf-8"), str(path))
        except RuleDefinitionError as exc:
            errors.append(str(exc))
            continue
        if rule.id in ids:
            errors.append(f"{path}:1: id: rule {rule.id!r} is also defined in {ids[rule.id]}")
        drafting = isinstance(rule.params, DraftParams)
        if known_templates is not None and drafting and rule.params.template not in known_templates:  # type: ignore[union-attr]
            errors.append(
                f"{path}: params.template: no promotion template {rule.params.template!r} "  # type: ignore[union-attr]
                f"(known: {', '.join(sorted(known_templates)) or 'none'})"
            )
        ids[rule.id] = str(path)
        rules.append((rule, str(path)))
    if errors:
        raise RuleDefinitionError("\n".join(errors))
    results = [store_rule(session=session, rule=rule, source=source) for rule, source in rules]
    if channels is not None:
        results.append(store_channels(session=session, channels=channels[0], source=channels[1]))
    return results


def latest_config_rows(session: Session, kind_like: str) -> list[ConfigVersion]:
    rows = session.scalars(
        select(ConfigVersion)
        .where(ConfigVersion.kind.like(kind_like))
        .order_by(ConfigVersion.kind, ConfigVersion.version)
    )
    latest: dict[str, ConfigVersion] = {}
    for row in rows:
        latest[row.kind] = row
    return list(latest.values())


def rule_from_row(row: ConfigVersion) -> AnyRule:
    return RULE_ADAPTER.validate_python({**row.content, "version": row.version})


def stored_rules(*, session: Session, enabled_only: bool = False) -> list[AnyRule]:
    """The version in force of every stored rule (drafts included unless `enabled_only`)."""
    rules = [rule_from_row(row) for row in latest_config_rows(session, RULE_KIND_PREFIX + "%")]
    return [r for r in rules if r.enabled or not enabled_only]


def stored_rule(*, session: Session, rule_id: str) -> AnyRule | None:
    row = session.scalars(
        select(ConfigVersion)
        .where(ConfigVersion.kind == RULE_KIND_PREFIX + rule_id)
        .order_by(ConfigVersion.version.desc())
        .limit(1)
    ).first()
    return rule_from_row(row) if row else None


def rule_versions(*, session: Session, rule_id: str) -> list[ConfigVersion]:
    return list(
        session.scalars(
            select(ConfigVersion)
            .where(ConfigVersion.kind == RULE_KIND_PREFIX + rule_id)
            .order_by(ConfigVersion.version)
        )
    )


def active_channels(*, session: Session) -> ChannelSet:
    rows = latest_config_rows(session, CHANNELS_KIND)
    if not rows:
        return ChannelSet()
    return ChannelSet.model_validate({**rows[0].content, "version": rows[0].version})
