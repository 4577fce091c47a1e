"""Promotion templates: YAML under seeds/promotions/, validated, versioned in the database.

A template names the promotion's kind, its parameters with a default and the bounds a manager
may edit them within, how long it runs, how long a draft waits for a decision, which SKUs are
eligible, and the title and till text in zh-CN and en with placeholders ({sku_name},
{percent}, ...). A draft fills the template from a rule's evidence; it keeps the template's
version, so a later edit of the file never changes a draft already made.
"""

from __future__ import annotations

import string
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from store_rules.alerts.definitions import (
    RULES_DIR,
    RuleDefinitionError,
    latest_config_rows,
    load_rules_dir,
    parse_yaml_mapping,
)
from store_rules.definitions import Text, store_version
from store_rules.models import ConfigVersion

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "seeds" / "promotions"
TEMPLATE_KIND_PREFIX = "promotion_template:"

Kind = Literal["percent_off", "amount_off", "buy_x_get_y", "gift_with_purchase"]
# The parameters each kind needs; others (e.g. a discount on top of a gift) are allowed too.
REQUIRED_PARAMS: dict[str, tuple[str, ...]] = {
    "percent_off": ("percent",),
    "amount_off": ("amount",),
    "buy_x_get_y": ("buy", "get"),
    "gift_with_purchase": ("min_qty", "gift_qty"),
}
# Values the text placeholders may use besides the parameters.
TEXT_FIELDS = ("sku", "sku_name", "gift_name", "limit_units", "days")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamSpec(Strict):
    default: Decimal
    min: Decimal
    max: Decimal
    integer: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> ParamSpec:
        if not self.min <= self.default <= self.max:
            raise ValueError(f"expected min ≤ default ≤ max, got {self.min} ≤ {self.default} ≤ {self.max}")
        if self.integer and any(v != v.to_integral_value() for v in (self.default, self.min, self.max)):
            raise ValueError("an integer parameter needs whole numbers for default, min and max")
        return self


class Eligible(Strict):
    """Which SKUs the promotion applies to: the SKU the rule named, a fixed list, or both."""

    subject: bool = True
    skus: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _something(self) -> Eligible:
        if not self.subject and not self.skus:
            raise ValueError("give subject: true or a list of skus")
        return self


class PromotionTemplate(Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    name: Text
    kind: Kind
    params: dict[str, ParamSpec]
    gift_sku: str | None = None
    duration_days: int = Field(ge=1, le=365)
    decide_within_hours: float = Field(default=24, gt=0, le=24 * 30)
    eligible: Eligible = Field(default_factory=Eligible)
    limit_units_from_evidence: bool = Field(
        default=False, description="cap the units sold at the quantity the rule found at risk"
    )
    title: Text
    till_text: Text
    version: int = Field(default=0, exclude=True)

    @model_validator(mode="after")
    def _consistent(self) -> PromotionTemplate:
        missing = [p for p in REQUIRED_PARAMS[self.kind] if p not in self.params]
        if missing:
            raise ValueError(f"kind {self.kind} needs the parameter(s) {', '.join(missing)}")
        if self.kind == "gift_with_purchase" and not self.gift_sku:
            raise ValueError("kind gift_with_purchase needs gift_sku")
        known = set(self.params) | set(TEXT_FIELDS)
        for field_name, text in (("title", self.title), ("till_text", self.till_text)):
            for value in (text.zh_cn, text.en):
                for _, name, _, _ in string.Formatter().parse(value):
                    if name is not None and name not in known:
                        raise ValueError(
                            f"{field_name}: unknown placeholder {{{name}}} (known: {', '.join(sorted(known))})"
                        )
        return self

    def defaults(self) -> dict[str, Decimal]:
        return {name: spec.default for name, spec in self.params.items()}

    def checked_params(self, edits: dict[str, Any] | None) -> dict[str, Decimal]:
        """The defaults with a manager's edits applied; a value out of bounds names the parameter and the bounds."""
        params = self.defaults()
        for name, raw in (edits or {}).items():
            spec = self.params.get(name)
            if spec is None:
                raise ValueError(f"params.{name}: not a parameter of template {self.id} ({', '.join(self.params)})")
            try:
                value = Decimal(str(raw))
            except ArithmeticError:
                raise ValueError(f"params.{name}: {raw!r} is not a number") from None
            if isinstance(raw, bool) or not value.is_finite():
                raise ValueError(f"params.{name}: {raw!r} is not a number")
            if spec.integer and value != value.to_integral_value():
                raise ValueError(f"params.{name}: must be a whole number")
            if not spec.min <= value <= spec.max:
                raise ValueError(f"params.{name}: {value} is outside the template's bounds [{spec.min}, {spec.max}]")
            params[name] = value
        return params

    def texts(self, values: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
        """(title, till text) in both languages with the placeholders filled.

        A value given as {"zh-CN": ..., "en": ...} (a SKU's name) is taken in each text's language.
        """

        def localised(language: str) -> dict[str, Any]:
            return {k: v.get(language, "") if isinstance(v, dict) else v for k, v in values.items()}

        zh, en = localised("zh-CN"), localised("en")

        def fill(text: Text) -> dict[str, str]:
            return {"zh-CN": text.zh_cn.format_map(zh), "en": text.en.format_map(en)}

        return fill(self.title), fill(self.till_text)


def plain(value: Decimal) -> str:
    """15.00 → 15, 2.50 → 2.5: numbers as people write them."""
    return format(value.normalize(), "f")


def json_number(value: Decimal) -> int | float:
    """A parameter as a JSON number for tills: whole numbers stay integers."""
    return int(value) if value == value.to_integral_value() else float(value)


def parse_template(text: str, source: str = "<text>") -> PromotionTemplate:
    return parse_yaml_mapping(text, source, PromotionTemplate.model_validate, "template")


def load_templates_dir(*, session: Session, directory: Path = TEMPLATES_DIR) -> list[tuple[str, int, bool]]:
    """Validate every template file, then store the changed ones; a bad file stores nothing."""
    templates: list[tuple[PromotionTemplate, str]] = []
    errors: list[str] = []
    seen: dict[str, str] = {}
    for path in sorted(directory.glob("*.yaml")):
        try:
            template = parse_template(path.read_text("utf-8"), str(path))
        except RuleDefinitionError as exc:
            errors.append(str(exc))
            continue
        if template.id in seen:
            errors.append(f"{path}:1: id: template {template.id!r} is also defined in {seen[template.id]}")
        seen[template.id] = str(path)
        templates.append((template, str(path)))
    if errors:
        raise RuleDefinitionError("\n".join(errors))
    results = []
    for template, source in templates:
        kind = TEMPLATE_KIND_PREFIX + template.id
        content = template.model_dump(mode="json", by_alias=True)
        version, created = store_version(session=session, kind=kind, content=content, source=source)
        results.append((kind, version, created))
    return results


def _from_row(row: ConfigVersion) -> PromotionTemplate:
    return PromotionTemplate.model_validate({**row.content, "version": row.version})


def stored_template(*, session: Session, template_id: str, version: int | None = None) -> PromotionTemplate | None:
    """A template's version in force, or the given version (the one a draft was made from)."""
    query = select(ConfigVersion).where(ConfigVersion.kind == TEMPLATE_KIND_PREFIX + template_id)
    query = query.where(ConfigVersion.version == version) if version else query.order_by(ConfigVersion.version.desc())
    row = session.scalars(query.limit(1)).first()
    return _from_row(row) if row else None


def stored_templates(*, session: Session) -> list[PromotionTemplate]:
    return [_from_row(row) for row in latest_config_rows(session, TEMPLATE_KIND_PREFIX + "%")]


def load_templates_and_rules(
    *, session: Session, templates_dir: Path = TEMPLATES_DIR, rules_dir: Path = RULES_DIR
) -> list[tuple[str, int, bool]]:
    """Templates first, then the rules, which may only name templates that exist."""
    results = load_templates_dir(session=session, directory=templates_dir)
    known = {template.id for template in stored_templates(session=session)}
    for loaded in load_rules_dir(session=session, directory=rules_dir, known_templates=known):
        results.append((loaded.kind, loaded.version, loaded.created))
    return results
