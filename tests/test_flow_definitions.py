"""Flow and prompt definitions (versioned configuration) and the pure consultation state machine."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from ingest.contract import STEPS
from ingest.db import session_scope
from store_rules.definitions import (
    CONFIG_DIR,
    FLOW_KIND,
    DefinitionError,
    FlowDefinition,
    active_flow,
    load_config_dir,
    parse_definition,
    store_definition,
    versions,
)
from store_rules.flow import Consultation, StepRecord, StepRefused

T0 = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)


def shipped_flow() -> FlowDefinition:
    flow = parse_definition(FLOW_KIND, (CONFIG_DIR / "counter_flow.yaml").read_text("utf-8"))
    assert isinstance(flow, FlowDefinition)
    return flow


def rec(step: str, minute: int, status: str = "done", **kw: object) -> StepRecord:
    return StepRecord(step, status, T0 + timedelta(minutes=minute), "E1", **kw)  # type: ignore[arg-type]


def test_the_shipped_flow_is_the_five_steps_in_order() -> None:
    flow = shipped_flow()
    assert flow.required_steps == list(STEPS)
    assert [s.name.zh_cn for s in flow.steps] == ["客户问诊", "症状记录", "药品推荐", "医保核验", "用药指导"]


def test_state_machine_orders_supersedes_and_flags_disorder() -> None:
    flow = shipped_flow()
    consultation = Consultation.of(flow, [rec("consultation", 0), rec("insurance_check", 1), rec("symptoms", 2)])
    assert consultation.done == ["consultation", "symptoms", "insurance_check"]
    assert consultation.missing == ["recommendation", "guidance"]
    assert consultation.out_of_order == ["insurance_check"]
    corrected = Consultation.of(flow, [*consultation.records, rec("symptoms", 3, "skipped", skip_reason="顾客拒绝")])
    assert corrected.skipped == ["symptoms"] and len(corrected.records) == 4
    with pytest.raises(StepRefused, match="step: recommendation must be done or skipped before guidance"):
        corrected.check_next("guidance", "done", skip_reason=None, data=None)
    with pytest.raises(StepRefused, match=r"data.skus: recommendation needs at least 1 item\(s\)"):
        corrected.check_next("recommendation", "done", skip_reason=None, data={"skus": []})
    with pytest.raises(StepRefused, match="skip_reason: a skipped step needs a reason"):
        corrected.check_next("recommendation", "skipped", skip_reason=" ", data=None)
    corrected.check_next("recommendation", "skipped", skip_reason="repeat_prescription", data=None)
    corrected.check_next("recommendation", "skipped", skip_reason="复购老方", data=None)
    with pytest.raises(StepRefused, match="is not a listed reason"):
        corrected.check_next("recommendation", "skipped", skip_reason="other:", data=None)


def test_bad_definitions_are_refused_with_the_reason() -> None:
    with pytest.raises(DefinitionError, match=r"flow.yaml: not valid YAML"):
        parse_definition(FLOW_KIND, "steps: [", "flow.yaml")
    text = (CONFIG_DIR / "counter_flow.yaml").read_text("utf-8")
    unknown_step = text.replace("  - id: guidance\n", "  - id: payment\n")
    with pytest.raises(DefinitionError, match=re.escape("flow.yaml: steps.4.id: Input should be 'consultation'")):
        parse_definition(FLOW_KIND, unknown_step, "flow.yaml")
    reordered = text.replace("  - id: symptoms\n", "  - id: TMP\n").replace(
        "  - id: recommendation\n", "  - id: symptoms\n"
    )
    with pytest.raises(DefinitionError, match="steps: must keep the order of the five-step flow"):
        parse_definition(FLOW_KIND, reordered.replace("  - id: TMP\n", "  - id: recommendation\n"), "flow.yaml")
    one_option = (CONFIG_DIR / "prompts.yaml").read_text("utf-8").split("      - {value: referral")[
        0
    ] + "    required: sale\n"
    with pytest.raises(DefinitionError, match="a choice needs at least two options"):
        parse_definition("prompts", one_option, "prompts.yaml")


def test_definitions_are_versioned_and_the_newest_is_in_force(engine: Engine, tmp_path: Path) -> None:
    with session_scope(engine) as session:
        assert active_flow(session=session).version == 0  # the shipped file until something is loaded
        assert [(k, v, c) for k, v, c in load_config_dir(session=session)] == [
            ("counter_flow", 1, True), ("prompts", 1, True),
        ]  # fmt: skip
        assert [c for _, _, c in load_config_dir(session=session)] == [False, False]
    text = (CONFIG_DIR / "counter_flow.yaml").read_text("utf-8")
    without_guidance = text.split("  - id: guidance")[0] + "skip_reasons:" + text.split("skip_reasons:")[1]
    with session_scope(engine) as session:
        assert store_definition(session=session, kind=FLOW_KIND, text=without_guidance, source="edit") == (2, True)
    with session_scope(engine) as session:
        flow = active_flow(session=session)
        assert (flow.version, flow.required_steps) == (2, list(STEPS[:4]))
        assert [(v.kind, v.version) for v in versions(session=session)] == [
            ("counter_flow", 1), ("counter_flow", 2), ("prompts", 1),
        ]  # fmt: skip
