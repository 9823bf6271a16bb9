"""The probes a load balancer or orchestrator calls: no key, any Host header."""

from __future__ import annotations

import pytest
from django.db import OperationalError
from django.test import Client, override_settings

from routing import middleware

pytestmark = pytest.mark.django_db


@override_settings(ALLOWED_HOSTS=["gateway.example.com"])
def test_probes_answer_without_a_key_at_the_containers_address():
    client = Client(HTTP_HOST="10.0.0.7:8000")  # not an allowed host: as a probe calls it

    alive = client.get("/healthz")
    ready = client.get("/readyz")

    assert (alive.status_code, alive.json()) == (200, {"status": "ok"})
    assert (ready.status_code, ready.json()) == (200, {"status": "ready", "database": "ok"})
    assert ready["x-request-id"].startswith("req_")
    # Everything else still refuses that Host.
    assert client.get("/v1/models").status_code == 400


class _Unreachable:
    def cursor(self):
        raise OperationalError('connection to server at "db.internal" failed: password ...')


def test_not_ready_when_the_database_cannot_be_reached(monkeypatch, caplog):
    monkeypatch.setattr(middleware, "connection", _Unreachable())

    answer = Client().get("/readyz")

    assert answer.status_code == 503
    assert answer.json() == {"status": "unavailable", "database": "unreachable"}
    assert b"db.internal" not in answer.content
    assert "Readiness probe: the database cannot be reached" in caplog.text
    assert Client().get("/healthz").status_code == 200  # the process itself answers
