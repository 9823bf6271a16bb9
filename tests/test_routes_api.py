"""Routes in the management API and the admin: validation, who may write, and the
explain dry run, which answers without calling or holding anything."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model

from billing.models import UsageEvent
from routing.models import Provider, Route, RouteTarget
from tenants.budgets import budget_set
from tenants.models import BudgetReservation
from tenants.services import api_key_issue, staff_token_issue, tenant_create

from .conftest import api, model_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def catalog():
    # Nothing listens on port 9: an explain that called out would fail loudly.
    provider = Provider.objects.create(name="p", base_url="http://127.0.0.1:9/v1")
    models = {
        name: model_create(name, provider=provider, output=Decimal(out))
        for name, out in (
            ("flash", "0.25"),
            ("vision", "0.52"),
            ("big", "2.34"),
            ("cheap", "0.01"),
            ("default", "0.28"),
        )
    }
    tenant = tenant_create(slug="acme", name="Acme", model_ids=list(models))
    return models, tenant


def seeds_router() -> dict:
    return {
        "name": "auto",
        "strategy": "rules",
        "targets": [
            {"model": "vision", "when_image": True},
            {"model": "big", "when_reasoning": True, "min_prompt_tokens": 2000},
            {"model": "cheap", "max_prompt_chars": 200},
            {"model": "default"},
        ],
    }


def test_a_superuser_creates_reads_and_replaces_a_route(catalog, superuser_token):
    client = api(token=superuser_token)

    created = client.post("/api/routes/", seeds_router(), format="json")
    assert created.status_code == 201, created.content
    assert [t["model"] for t in created.json()["targets"]] == ["vision", "big", "cheap", "default"]

    read = client.get("/api/routes/auto/").json()
    assert read["targets"][1] == {
        "model": "big",
        "route": None,
        "timeout_seconds": None,
        "weight": 1,
        "when_image": False,
        "when_reasoning": True,
        "min_prompt_tokens": 2000,
        "max_prompt_chars": None,
    }
    changed = client.patch(
        "/api/routes/auto/", {"targets": [{"model": "flash", "timeout_seconds": 10}]}, format="json"
    )
    assert changed.status_code == 200, changed.content
    assert list(
        Route.objects.get(name="auto").targets.values_list("model__public_id", flat=True)
    ) == ["flash"]


@pytest.mark.parametrize(
    ("payload", "field", "words"),
    [
        ({"name": "x", "strategy": "fallback", "targets": []}, "targets", "at least one target"),
        (
            {"name": "x", "strategy": "split", "targets": [{"model": "flash", "weight": 0}]},
            "targets",
            "weight must be a positive whole number",
        ),
        ({"name": "x", "targets": [{"model": "nope"}]}, "targets", "does not exist"),
        ({"name": "x", "targets": [{}]}, "targets", "choose a model or a route"),
        ({"name": "flash", "targets": [{"model": "cheap"}]}, "name", "catalog model"),
        ({"name": "bad name!", "targets": [{"model": "cheap"}]}, "name", "letters, digits"),
    ],
)
def test_invalid_routes_are_refused_with_a_reason(catalog, superuser_token, payload, field, words):
    response = api(token=superuser_token).post("/api/routes/", payload, format="json")

    assert response.status_code == 400
    assert words.lower() in str(response.json()[field]).lower()
    assert not Route.objects.exists()


def test_a_cycle_through_routes_is_refused(catalog, superuser_token):
    client = api(token=superuser_token)
    client.post("/api/routes/", {"name": "inner", "targets": [{"model": "flash"}]}, format="json")
    client.post("/api/routes/", {"name": "outer", "targets": [{"route": "inner"}]}, format="json")

    response = client.patch("/api/routes/inner/", {"targets": [{"route": "outer"}]}, format="json")

    assert response.status_code == 400
    assert "cycle: inner -> outer -> inner" in str(response.json()["targets"])
    assert Route.objects.get(name="inner").targets.get().model.public_id == "flash"
    deleted = client.delete("/api/routes/inner/")
    assert deleted.status_code == 400
    assert "outer" in deleted.json()["detail"]


def test_members_read_routes_but_only_superusers_write(catalog, superuser_token):
    _, tenant = catalog
    api(token=superuser_token).post("/api/routes/", seeds_router(), format="json")
    member = get_user_model().objects.create_user("ops", password="pw-ops-12345", is_staff=True)
    tenant.members.add(member)
    token = staff_token_issue(user=member, name="ops").secret

    assert api(token=token).get("/api/routes/").json()["results"][0]["name"] == "auto"
    refused = api(token=token).post(
        "/api/routes/", {"name": "y", "targets": [{"model": "flash"}]}, format="json"
    )
    assert refused.status_code == 403
    assert api().get("/api/routes/").status_code in (401, 403)


def explain(client, body, **params):
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return client.post(f"/api/routes/auto/explain/?{query}", body, format="json")


IMAGE = {
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        }
    ]
}


def test_explain_says_which_target_and_why_without_calling_anything(catalog, superuser_token):
    client = api(token=superuser_token)
    client.post("/api/routes/", seeds_router(), format="json")

    image = explain(client, IMAGE, tenant="acme").json()
    short = explain(client, {"messages": [{"role": "user", "content": "hi"}]}, tenant="acme")

    assert image["chosen"] == "vision"
    assert image["request"]["has_image"] is True
    assert "auto: rule 1 matched (has an image) -> vision" in image["steps"]
    assert image["attempts"][0]["provider"] == "p"
    assert short.json()["chosen"] == "cheap"
    assert any("rule 3 matched" in s for s in short.json()["steps"])
    assert not UsageEvent.objects.exists()
    assert not BudgetReservation.objects.exists()


def test_explain_as_a_key_skips_what_the_key_may_not_use_and_what_the_budget_cannot_pay(
    catalog, superuser_token
):
    _, tenant = catalog
    client = api(token=superuser_token)
    client.post("/api/routes/", seeds_router(), format="json")
    key = api_key_issue(tenant=tenant, name="no-vision", model_ids=["cheap", "default"]).key

    answer = explain(client, IMAGE, key=key.prefix).json()
    assert answer["chosen"] == "cheap"
    assert {"model": "vision", "reason": "not in this key's model allowlist"} in answer["skipped"]

    budget_set(tenant=tenant, limit_usd=Decimal("0.000001"), hard=True)
    broke = explain(client, {"messages": [{"role": "user", "content": "hi"}]}, tenant="acme")
    assert broke.json()["chosen"] is None
    assert "budget" in broke.json()["error"]
    reasons = [s["reason"] for s in broke.json()["skipped"]]
    assert reasons
    assert all(
        r.endswith("in the monthly budget of this tenant (limit $0.000001)") for r in reasons
    )


def test_explain_refuses_a_bad_body_and_hides_other_tenants(catalog, superuser_token):
    _, tenant = catalog
    client = api(token=superuser_token)
    client.post("/api/routes/", seeds_router(), format="json")
    tenant_create(slug="globex", name="Globex", model_ids=["flash"])
    member = get_user_model().objects.create_user("ops", password="pw-ops-12345", is_staff=True)
    tenant.members.add(member)
    token = staff_token_issue(user=member, name="ops").secret

    bad = explain(client, {"messages": "nope"}, tenant="acme")
    assert bad.status_code == 400
    assert "messages" in bad.json()
    assert explain(api(token=token), IMAGE, tenant="globex").status_code == 404
    assert explain(api(token=token), IMAGE, tenant="acme").json()["chosen"] == "vision"


def test_the_admin_edits_routes_and_refuses_a_cycle(catalog, admin_client):
    models, _ = catalog
    inner = Route.objects.create(name="inner")
    RouteTarget.objects.create(route=inner, model=models["flash"])
    outer = Route.objects.create(name="outer")
    RouteTarget.objects.create(route=outer, subroute=inner)
    target = inner.targets.get()

    form = {
        "name": "inner",
        "description": "",
        "strategy": "fallback",
        "enabled": "on",
        "targets-TOTAL_FORMS": "1",
        "targets-INITIAL_FORMS": "1",
        "targets-MIN_NUM_FORMS": "0",
        "targets-MAX_NUM_FORMS": "1000",
        "targets-0-id": str(target.pk),
        "targets-0-route": str(inner.pk),
        "targets-0-position": "0",
        "targets-0-subroute": str(outer.pk),
        "targets-0-weight": "1",
    }
    response = admin_client.post(f"/admin/routing/route/{inner.pk}/change/", form)

    assert response.status_code == 200
    assert "These targets make a cycle: inner -&gt; outer -&gt; inner." in response.content.decode()
    assert inner.targets.get().model == models["flash"]

    form["targets-0-subroute"] = ""
    form["targets-0-model"] = str(models["cheap"].pk)
    saved = admin_client.post(f"/admin/routing/route/{inner.pk}/change/", form)
    assert saved.status_code == 302
    assert inner.targets.get().model == models["cheap"]
    listing = admin_client.get("/admin/routing/route/").content.decode()
    assert "inner" in listing and "cheap" in listing
