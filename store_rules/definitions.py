"""Counter-flow and scan-prompt definitions: YAML in seeds/config/, versioned in the database.

Loading a file whose content changed adds a new version; the newest version of each kind is
the one in force. Definitions are plain pydantic models, usable without a database.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from cachetools import LRUCache, TTLCache
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ingest.contract import STEPS
from ingest.models import Sku
from store_rules.models import ConfigVersion

CONFIG_DIR = Path(__file__).resolve().parents[1] / "seeds" / "config"
FLOW_KIND = "counter_flow"
PROMPTS_KIND = "prompts"


class Text(BaseModel):
    """A text in both UI languages."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")
    zh_cn: str = Field(alias="zh-CN", min_length=1)
    en: str = Field(min_length=1)

    def as_dict(self) -> dict[str, str]:
        return {"zh-CN": self.zh_cn, "en": self.en}


@dataclass(frozen=True)
class SkuMaster:
    """The master-data fields the counter needs, detached from any session so processes can cache them."""

    sku: str
    name_zh: str
    name_en: str
    category: str
    is_rx: bool
    flow_controlled: bool
    prompt_triggering: bool
    insurance_eligible: bool

    @classmethod
    def of(cls, row: Sku) -> SkuMaster:
        return cls(
            row.sku, row.name_zh, row.name_en, row.category, bool(row.is_rx), bool(row.flow_controlled),
            bool(row.prompt_triggering), bool(row.insurance_eligible),
        )  # fmt: skip


class Selector(BaseModel):
    """Which SKUs something applies to: any of the listed SKUs, categories or master-data flags."""

    model_config = ConfigDict(extra="forbid")
    skus: list[str] = Field(default_factory=list)
    categories: list[str] = Field(default_factory=list)
    flags: list[Literal["flow_controlled", "is_rx", "insurance_eligible", "prompt_triggering"]] = Field(
        default_factory=list
    )

    def matches(self, sku: Sku | SkuMaster | None, sku_code: str) -> bool:
        if sku_code in self.skus:
            return True
        if sku is None:
            return False
        return sku.category in self.categories or any(getattr(sku, flag) for flag in self.flags)


class Requirement(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_items: int | None = None
    one_of: list[str] | None = None
    min_length: int | None = None


class StepDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: Literal["consultation", "symptoms", "recommendation", "insurance_check", "guidance"]
    name: Text
    requires: dict[str, Requirement] = Field(default_factory=dict)

    def data_problem(self, data: dict[str, Any] | None) -> str | None:
        """Why a `done` step's data is not enough, or None."""
        data = data or {}
        for key, rule in self.requires.items():
            value = data.get(key)
            if rule.min_items is not None and (not isinstance(value, list) or len(value) < rule.min_items):
                return f"data.{key}: {self.id} needs at least {rule.min_items} item(s)"
            if rule.one_of is not None and value not in rule.one_of:
                return f"data.{key}: {self.id} needs one of {', '.join(rule.one_of)}"
            if rule.min_length is not None and (not isinstance(value, str) or len(value.strip()) < rule.min_length):
                return f"data.{key}: {self.id} needs a text of at least {rule.min_length} character(s)"
        return None


class SkipReason(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    label: Text
    free_text: bool = False


class FlowDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    controlled: Selector
    steps: list[StepDefinition] = Field(min_length=1)
    skip_reasons: list[SkipReason] = Field(min_length=1)
    version: int = 0

    @model_validator(mode="after")
    def _ordered_unique_steps(self) -> FlowDefinition:
        ids = [s.id for s in self.steps]
        if len(ids) != len(set(ids)):
            raise ValueError("steps: a step is listed twice")
        if ids != sorted(ids, key=STEPS.index):
            raise ValueError(f"steps: must keep the order of the five-step flow ({' → '.join(STEPS)})")
        return self

    @property
    def required_steps(self) -> list[str]:
        return [s.id for s in self.steps]

    def step(self, step_id: str) -> StepDefinition | None:
        return next((s for s in self.steps if s.id == step_id), None)

    def skip_reason_problem(self, reason: str | None) -> str | None:
        """None if the reason is one of the listed ones (id or label), or free text where allowed."""
        text = (reason or "").strip()
        if not text:
            return "skip_reason: a skipped step needs a reason"
        for option in self.skip_reasons:
            if text in (option.id, option.label.zh_cn, option.label.en):
                return None
            prefix = next(
                (p for p in (option.id, option.label.zh_cn, option.label.en) if text.startswith(p + ":")), None
            )
            if option.free_text and prefix and text[len(prefix) + 1 :].strip():
                return None
        allowed = ", ".join(o.id for o in self.skip_reasons)
        return f"skip_reason: {text!r} is not a listed reason (one of {allowed}; free text as 'other: …')"


class PromptOption(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")
    value: str
    zh_cn: str = Field(alias="zh-CN")
    en: str


class PromptDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    question: Text
    trigger: Selector
    input_type: Literal["choice", "text", "number"]
    options: list[PromptOption] = Field(default_factory=list)
    required: Literal["always", "sale", "return", "never"] = "always"
    frequency: Literal["once_per_receipt", "every_scan"] = "once_per_receipt"

    @model_validator(mode="after")
    def _choices_have_options(self) -> PromptDefinition:
        if self.input_type == "choice" and len(self.options) < 2:
            raise ValueError(f"prompts.{self.id}.options: a choice needs at least two options")
        return self

    def is_required(self, kind: str) -> bool:
        return self.required == "always" or self.required == kind

    def answer_problem(self, answer: str) -> str | None:
        if self.input_type == "choice" and answer not in {o.value for o in self.options}:
            return f"answer: {answer!r} is not an option of {self.id} ({', '.join(o.value for o in self.options)})"
        if self.input_type == "number":
            try:
                float(answer)
            except ValueError:
                return f"answer: {self.id} needs a number"
        if not answer.strip():
            return "answer: empty"
        return None


class PromptSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: list[PromptDefinition]
    version: int = 0


class DefinitionError(ValueError):
    pass


_MODELS: dict[str, type[FlowDefinition] | type[PromptSet]] = {FLOW_KIND: FlowDefinition, PROMPTS_KIND: PromptSet}
_FILES = {FLOW_KIND: "counter_flow.yaml", PROMPTS_KIND: "prompts.yaml"}


def parse_definition(kind: str, text: str, source: str = "<text>") -> FlowDefinition | PromptSet:
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DefinitionError(f"{source}: not valid YAML ({exc})") from None
    try:
        return _MODELS[kind].model_validate(content)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors(include_url=False)
        )
        raise DefinitionError(f"{source}: {problems}") from None


def store_definition(*, session: Session, kind: str, text: str, source: str) -> tuple[int, bool]:
    """Validate and keep a definition; returns (version, created). Unchanged content keeps its version."""
    definition = parse_definition(kind, text, source)
    version, created = store_version(
        session=session, kind=kind, content=definition.model_dump(mode="json", by_alias=True, exclude={"version"}),
        source=source,
    )  # fmt: skip
    if created:
        forget_active_definitions()
    return version, created


def store_version(*, session: Session, kind: str, content: dict[str, Any], source: str) -> tuple[int, bool]:
    """Keep `content` as the next version of a config kind; returns (version, created).

    Unchanged content (same checksum as the newest version) keeps its version.
    """
    checksum = hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    latest = session.scalars(
        select(ConfigVersion).where(ConfigVersion.kind == kind).order_by(ConfigVersion.version.desc()).limit(1)
    ).first()
    if latest is not None and latest.checksum == checksum:
        return latest.version, False
    version = (latest.version if latest else 0) + 1
    session.add(
        ConfigVersion(
            kind=kind, version=version, checksum=checksum, content=content, source=source,
            loaded_at=datetime.now(UTC),
        )
    )  # fmt: skip
    session.flush()
    return version, True


def load_config_dir(*, session: Session, directory: Path = CONFIG_DIR) -> list[tuple[str, int, bool]]:
    results = []
    for kind, name in _FILES.items():
        path = directory / name
        version, created = store_definition(session=session, kind=kind, text=path.read_text("utf-8"), source=str(path))
        results.append((kind, version, created))
    return results


# How long a process may keep using a definition before it looks for a newer version: a till
# scans many times a second, definitions change a few times a year.
ACTIVE_TTL_S = 5.0
# Per (kind, database) and per (kind, database, version): a process talks to one database, the
# bound only matters to processes that meet many (tests, tools) or many versions.
DEFINITION_CACHE_SIZE = 64
# A till scans the same few hundred SKUs all day and master data changes at night: a master-data
# import reaches running API processes within this many seconds.
SKU_CACHE_TTL_S = 60.0
# A chain's catalogue is some ten thousand SKUs; unknown codes (mistyped, another chain's) are
# cached too, so without a bound a till sending random codes would grow the process without end.
SKU_CACHE_SIZE = 50_000

# FastAPI runs sync routes in a thread pool and cachetools caches are not thread-safe: every
# read and write of the caches below holds this lock (never while the database is queried).
_lock = threading.Lock()
_cache: LRUCache[tuple[str, str, int], FlowDefinition | PromptSet] = LRUCache(maxsize=DEFINITION_CACHE_SIZE)
_checked: TTLCache[tuple[str, str], FlowDefinition | PromptSet] = TTLCache(
    maxsize=DEFINITION_CACHE_SIZE, ttl=ACTIVE_TTL_S
)
_sku_cache: TTLCache[tuple[str, str], SkuMaster | None] = TTLCache(maxsize=SKU_CACHE_SIZE, ttl=SKU_CACHE_TTL_S)
_UNKNOWN = object()


def _active_definition(session: Session, kind: str) -> FlowDefinition | PromptSet:
    """The newest stored version of a kind, looked up at most every ACTIVE_TTL_S per database."""
    key = (kind, str(session.get_bind().engine.url))
    with _lock:
        hit = _checked.get(key)
    if hit is not None:
        return hit
    definition = _load_active_definition(session, kind)
    with _lock:
        _checked[key] = definition
    return definition


def forget_active_definitions() -> None:
    """Drop the cached definitions and SKU rows, e.g. after the tables were emptied by hand."""
    with _lock:
        _cache.clear()
        _checked.clear()
        _sku_cache.clear()


def _load_active_definition(session: Session, kind: str) -> FlowDefinition | PromptSet:
    """The newest stored version of a kind; the shipped file when nothing was loaded yet."""
    row = session.execute(
        select(ConfigVersion.version, ConfigVersion.content)
        .where(ConfigVersion.kind == kind)
        .order_by(ConfigVersion.version.desc())
        .limit(1)
    ).first()
    version = row[0] if row else 0
    key = (kind, str(session.get_bind().engine.url), version)
    with _lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    if row is None:
        definition = parse_definition(kind, (CONFIG_DIR / _FILES[kind]).read_text("utf-8"), _FILES[kind])
    else:
        definition = _MODELS[kind].model_validate({**row[1], "version": version})
    with _lock:
        _cache[key] = definition
    return definition


def active_flow(*, session: Session) -> FlowDefinition:
    definition = _active_definition(session, FLOW_KIND)
    assert isinstance(definition, FlowDefinition)
    return definition


def active_prompts(*, session: Session) -> PromptSet:
    definition = _active_definition(session, PROMPTS_KIND)
    assert isinstance(definition, PromptSet)
    return definition


def flow_controlled_skus(
    *, session: Session, flow: FlowDefinition | None = None, among: Iterable[str] | None = None
) -> set[str]:
    """SKU codes the active flow controls (master-data flags, categories, explicit SKUs).

    With `among`, only those codes are looked up: the till and the ingest hook ask about the
    few SKUs of one sale or batch, not the whole catalogue.
    """
    flow = flow or active_flow(session=session)
    if among is not None:
        wanted = set(among)
        codes = {code for code in flow.controlled.skus if code in wanted}
        codes.update(code for code, sku in cached_skus(session, wanted).items() if flow.controlled.matches(sku, code))
        return codes
    codes = set(flow.controlled.skus)
    for sku in session.scalars(select(Sku)):
        if flow.controlled.matches(sku, sku.sku):
            codes.add(sku.sku)
    return codes


def versions(*, session: Session, kind: str | None = None) -> list[ConfigVersion]:
    query = select(ConfigVersion).order_by(ConfigVersion.kind, ConfigVersion.version)
    if kind:
        query = query.where(ConfigVersion.kind == kind)
    return list(session.scalars(query))


def version_count(*, session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(ConfigVersion)) or 0)


def skus_by_code(session: Session, codes: Iterable[str]) -> dict[str, Sku]:
    codes = set(codes)
    if not codes:
        return {}
    return {s.sku: s for s in session.scalars(select(Sku).where(Sku.sku.in_(codes)))}


def cached_skus(session: Session, codes: Iterable[str]) -> dict[str, SkuMaster]:
    """Master rows of the known codes among `codes`, from a per-process cache (unknown codes cached too)."""
    database = str(session.get_bind().engine.url)
    found: dict[str, SkuMaster] = {}
    missing = []
    with _lock:
        for code in set(codes):
            hit = _sku_cache.get((database, code), _UNKNOWN)
            if hit is _UNKNOWN:
                missing.append(code)
            elif isinstance(hit, SkuMaster):
                found[code] = hit
    if missing:
        loaded = {row.sku: SkuMaster.of(row) for row in session.scalars(select(Sku).where(Sku.sku.in_(missing)))}
        with _lock:
            for code in missing:
                _sku_cache[(database, code)] = loaded.get(code)
        found.update(loaded)
    return found
