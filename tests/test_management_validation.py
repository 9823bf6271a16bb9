"""What an operator may not set up, refused alike by the shell commands, the management
API and the admin (the rules live in the services and the models they share)."""

from __future__ import annotations

import io
import re
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse
from django.utils import timezone

from routing.models import CatalogModel
from tenants.models import ApiKey, StaffToken
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


def test_a_key_or_token_that_would_be_born_expired_is_refused_everywhere(
    acme, admin_client, admin_user, superuser_token
):
    past = {"expires_at_0": "2020-01-01", "expires_at_1": "00:00:00"}
    key_page = admin_client.post(
        reverse("admin:tenants_apikey_add"), {"tenant": acme.pk, "name": "old", **past}
    )
    assert key_page.status_code == 200
    assert key_page.context["adminform"].form.errors["expires_at"] == ["Must be in the future."]
    token_page = admin_client.post(
        reverse("admin:tenants_stafftoken_add"), {"user": admin_user.pk, "name": "old", **past}
    )
    assert token_page.status_code == 200
    assert token_page.context["adminform"].form.errors["expires_at"] == ["Must be in the future."]
    assert not ApiKey.objects.exists()
    assert not StaffToken.objects.filter(name="old").exists()

    created = api(token=superuser_token).post(
        "/api/keys/", {"tenant": "acme", "expires_at": "2020-01-01T00:00:00Z"}, format="json"
    )
    assert created.status_code == 400
    assert created.json()["expires_at"] == ["Must be in the future."]

    # An expired key stays editable in the admin (its name, say) without a new expiry.
    key = api_key_issue(tenant=acme, name="was", expires_at=timezone.now() + timedelta(hours=1)).key
    ApiKey.objects.filter(pk=key.pk).update(expires_at=timezone.now() - timedelta(days=1))
    expiry = ApiKey.objects.get(pk=key.pk).expires_at
    saved = admin_client.post(
        reverse("admin:tenants_apikey_change", args=[key.pk]),
        {
            "name": "renamed",
            "expires_at_0": expiry.strftime("%Y-%m-%d"),
            "expires_at_1": expiry.strftime("%H:%M:%S"),
        },
    )
    assert saved.status_code == 302
    assert ApiKey.objects.get(pk=key.pk).name == "renamed"
