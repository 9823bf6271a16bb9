"""What an operator may not set up, refused alike by the shell commands, the management
API and the admin (the rules live in the services and the models they share)."""

from __future__ import annotations

import io
import re

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse

from routing.models import CatalogModel
from tenants.models import ApiKey
from tenants.services import api_key_issue, tenant_create

from .conftest import api

pytestmark = pytest.mark.django_db

KIMI = "moonshotai/Kimi-K2.5"


def run(*args) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.fixture
def acme():
    return tenant_create(slug="acme", name="Acme", model_ids=["deepseek-v4-flash"])


def test_a_key_narrowed_to_models_outside_the_tenant_allowlist_is_refused_everywhere(
    acme, admin_client, superuser_token
):
    with pytest.raises(CommandError, match=f"Not in acme's allowlist: {re.escape(KIMI)}"):
        run("key_issue", "acme", "--models", f"deepseek-v4-flash,{KIMI}")

    client = api(token=superuser_token)
    created = client.post("/api/keys/", {"tenant": "acme", "models": [KIMI]}, format="json")
    assert created.status_code == 400
    assert KIMI in created.json()["models"][0] and "allowlist" in created.json()["models"][0]

    kimi = CatalogModel.objects.get(public_id=KIMI)
    page = admin_client.post(
        reverse("admin:tenants_apikey_add"),
        {"tenant": acme.pk, "name": "narrow", "allowed_models": [kimi.pk]},
    )
    assert page.status_code == 200
    assert f"{KIMI}" in page.context["adminform"].form.errors["allowed_models"][0]
    assert not ApiKey.objects.exists()

    # Changing an issued key's list is held to the same rule.
    key = api_key_issue(tenant=acme, model_ids=["deepseek-v4-flash"]).key
    patched = client.patch(f"/api/keys/{key.prefix}/", {"models": [KIMI]}, format="json")
    assert patched.status_code == 400 and KIMI in patched.json()["models"][0]
    changed = admin_client.post(
        reverse("admin:tenants_apikey_change", args=[key.pk]),
        {"name": "", "allowed_models": [kimi.pk]},
    )
    assert changed.status_code == 200
    assert KIMI in changed.context["adminform"].form.errors["allowed_models"][0]
    assert [m.public_id for m in key.allowed_models.all()] == ["deepseek-v4-flash"]

    # Within the allowlist, narrowing works on every surface.
    run("key_issue", "acme", "--models", "deepseek-v4-flash")
    ok = client.post(
        "/api/keys/", {"tenant": "acme", "models": ["deepseek-v4-flash"]}, format="json"
    )
    assert ok.status_code == 201, ok.content
