"""HTTP ingest over real loopback HTTP: device tokens, per-event results, health."""

from __future__ import annotations

import time

import httpx
from sqlalchemy import Engine, func, select

from ingest.db import session_scope
from ingest.models import DeadLetter, Receipt
from ingest.tokens import create_token, revoke_token
from tests import factories as f
from tests.conftest import LiveServer, make_app


def token_for(engine: Engine, store_id: str = "S001") -> tuple[int, str]:
    with session_scope(engine) as session:
        issued = create_token(session=session, store_id=store_id, name="till-1")
    return issued.id, issued.token


def post(server: LiveServer, body: object, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{server.url}/api/v1/events", json=body, headers=headers, timeout=10)


def test_batch_answers_per_event_in_input_order(chain: Engine, live_server: LiveServer) -> None:
    _, token = token_for(chain)
    events = [f.receipt(1), {**f.receipt(2), "total": "9.99"}, f.receipt(1), f.footfall(1)]
    response = post(live_server, {"events": events}, token)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [(r["event_id"], r["status"]) for r in results] == [
        ("S001-T1-1", "accepted"),
        ("S001-T1-2", "rejected"),
        ("S001-T1-1", "duplicate"),
        ("ff-S001-1", "accepted"),
    ]
    assert results[1]["error"].startswith("total: 9.99 is not the sum of line amounts")
    assert results[0]["error"] is None
    with session_scope(chain) as session:
        assert session.scalar(select(func.count()).select_from(Receipt)) == 1
        letter = session.scalars(select(DeadLetter)).one()
        assert letter.source == "http:till-1"


def test_token_of_one_store_cannot_publish_for_another(chain: Engine, live_server: LiveServer) -> None:
    _, token = token_for(chain, "S002")
    results = post(live_server, {"events": [f.receipt(1, store_id="S001")]}, token).json()["results"]
    assert results == [
        {"event_id": "S001-T1-1", "status": "rejected",
         "error": "store_id: this device token publishes for store 'S002' only"},
    ]  # fmt: skip


def test_missing_unknown_and_revoked_tokens_get_401(chain: Engine) -> None:
    token_id, token = token_for(chain)
    with LiveServer(make_app(chain, device_token_cache_s=1.0)) as server:
        assert post(server, {"events": []}, None).status_code == 401
        assert post(server, {"events": []}, "spd_not-a-real-token").status_code == 401
        assert post(server, {"events": []}, token).status_code == 200
        with session_scope(chain) as session:
            assert revoke_token(session=session, token_id=token_id)
        # Trusted tokens are cached for device_token_cache_s; the revocation applies once that has passed.
        assert post(server, {"events": []}, token).status_code == 200
        time.sleep(1.1)
        response = post(server, {"events": [f.receipt(1)]}, token)
    assert response.status_code == 401
    assert "revoked" in response.json()["detail"]


def test_a_body_that_is_not_a_batch_is_422(chain: Engine, live_server: LiveServer) -> None:
    _, token = token_for(chain)
    assert post(live_server, [f.receipt(1)], token).status_code == 422
    response = httpx.post(
        f"{live_server.url}/api/v1/events", content=b"{nope", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 422
    assert response.json()["detail"].startswith("body: not valid JSON")


def test_healthz_reports_database_and_broker(chain: Engine, mosquitto: tuple[str, int]) -> None:
    host, port = mosquitto
    with LiveServer(make_app(chain, mqtt_url=f"mqtt://{host}:{port}")) as server:
        body = httpx.get(f"{server.url}/healthz").json()
        assert body["status"] == "ok"
        assert body["database"]["ok"] is True
        assert body["broker"] == {"configured": True, "ok": True, "address": f"{host}:{port}"}
    from tests.conftest import free_port

    with LiveServer(make_app(chain, mqtt_url=f"mqtt://127.0.0.1:{free_port()}")) as server:
        response = httpx.get(f"{server.url}/healthz")
        assert response.status_code == 503
        assert response.json()["broker"]["ok"] is False


def test_openapi_documents_the_contract_endpoints(live_server: LiveServer) -> None:
    spec = httpx.get(f"{live_server.url}/openapi.json").json()
    assert "/api/v1/events" in spec["paths"]
    assert "/healthz" in spec["paths"]
    body = spec["paths"]["/api/v1/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "events" in body["properties"]
