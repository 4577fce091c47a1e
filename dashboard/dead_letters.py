"""The dead-letter pages for admins: what ingest refused, why, and a replay once the cause is fixed.

Only admins see them: a raw payload is whatever a till or integrator sent, so it is shown
escaped, with customer names masked and symptoms withheld like on every chain-wide page. The
unchanged payload stays on the server (`storepulse dead-letters show ID`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse

from dashboard.auth import Page, check_csrf, client_ip
from dashboard.deps import DbSession
from dashboard.permissions import of_person
from dashboard.rendering import render
from ingest.db import session_scope
from ingest.dead_letters import count_dead_letters, get_dead_letter, list_dead_letters, replay_dead_letters
from ingest.users import PageSession
from store_rules.privacy import SYMPTOMS_STEP, mask_name

router = APIRouter(include_in_schema=False)
PAGE_SIZE = 500
STATES = {"pending": False, "replayed": True}


def _admin_only(page: PageSession) -> None:
    if not of_person(page.principal).sees_dead_letters:
        raise HTTPException(403, detail="dead letters are for admins")


def _event_as_seen(event: Any) -> Any:
    if not isinstance(event, dict):
        return event
    seen = dict(event)
    customer = seen.get("customer")
    if isinstance(customer, dict) and isinstance(customer.get("name"), str):
        seen["customer"] = {**customer, "name": mask_name(customer["name"])}
    if seen.get("step") == SYMPTOMS_STEP and seen.get("data") is not None:
        seen["data"] = "(withheld)"
    return seen


def payload_as_seen(raw: str) -> str:
    """The payload for a chain-wide reader: JSON indented, names masked; anything else as received."""
    try:
        body = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(body, dict) and isinstance(body.get("events"), list) and "type" not in body:
        body = {**body, "events": [_event_as_seen(e) for e in body["events"]]}
    else:
        body = _event_as_seen(body)
    return json.dumps(body, ensure_ascii=False, indent=2)


@router.get("/admin/dead-letters", response_class=HTMLResponse)
def dead_letters_page(
    request: Request,
    session: DbSession,
    page: Page,
    reason: str | None = None,
    source: str | None = None,
    state: str | None = None,
) -> HTMLResponse:
    """Dead letters, newest first, filtered by part of the reason or source and by replay state."""
    _admin_only(page)
    filters: dict[str, Any] = {"reason": reason or None, "source": source or None, "replayed": STATES.get(state or "")}
    letters = list_dead_letters(session=session, limit=PAGE_SIZE, **filters)
    context = {
        "letters": letters, "total": count_dead_letters(session=session, **filters),
        "reason": reason or "", "source": source or "", "state": state if state in STATES else "",
        "zone": request.app.state.settings.chain_tz, "user": page,
    }  # fmt: skip
    return render(request, "dead_letters.html", context)


@router.get("/admin/dead-letters/{letter_id}", response_class=HTMLResponse)
def dead_letter_page(request: Request, letter_id: int, session: DbSession, page: Page) -> HTMLResponse:
    """One dead letter: reason, replay status and the payload (escaped, names masked)."""
    _admin_only(page)
    letter = get_dead_letter(session=session, letter_id=letter_id)
    if letter is None:
        raise HTTPException(404, detail=f"letter_id: no dead letter {letter_id}")
    context = {
        "letter": letter, "payload": payload_as_seen(letter.raw_payload),
        "zone": request.app.state.settings.chain_tz, "user": page,
    }  # fmt: skip
    return render(request, "dead_letter.html", context)


@router.post("/admin/dead-letters/{letter_id}/replay", response_model=None)
async def dead_letter_replay(
    request: Request, letter_id: int, page: Page, csrf_token: Annotated[str, Form(max_length=100)] = ""
) -> RedirectResponse:
    """Replay one dead letter now (audited); the page then shows its outcome."""
    _admin_only(page)
    check_csrf(page, csrf_token)
    engine, settings = request.app.state.engine, request.app.state.settings

    def run() -> bool:
        with session_scope(engine) as session:
            report = replay_dead_letters(
                session=session, ids=[letter_id], actor=page.principal.user_id, ip=client_ip(request),
                topic_prefix=settings.mqtt_topic_prefix,
            )  # fmt: skip
        return not report.missing

    if not await run_in_threadpool(run):
        raise HTTPException(404, detail=f"letter_id: no dead letter {letter_id}")
    return RedirectResponse(f"/admin/dead-letters/{letter_id}", status_code=303)
