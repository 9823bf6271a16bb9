"""What an operator may not set up, refused alike by the shell commands, the management
API and the admin (the rules live in the services and the models they share)."""

from __future__ import annotations

import io
import re
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.urls import reverse
from django.utils import timezone

from routing.models import CatalogModel, Provider
from tenants.models import ApiKey, StaffToken, Tenant
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


def test_tenant_slugs_are_lower_case_so_no_two_differ_only_in_case(admin_client, superuser_token):
    out, _ = run("tenant_create", "ACME", "--name", "Acme", "--models", "deepseek-v4-flash")
    assert out.strip() == "Created tenant acme with 1 allowed models."
    # The same letters in another case name the same tenant.
    out, _ = run("tenant_create", "Acme", "--name", "Acme Two")
    assert out.startswith("Updated tenant acme: name;")

    client = api(token=superuser_token)
    refused = client.post("/api/tenants/", {"slug": "aCmE", "name": "Acme3"}, format="json")
    assert refused.status_code == 400
    assert "already exists" in refused.json()["slug"][0]
    globex = client.post("/api/tenants/", {"slug": "GloBex", "name": "Globex"}, format="json")
    assert globex.status_code == 201 and globex.json()["slug"] == "globex"
    renamed = client.patch("/api/tenants/globex/", {"slug": "ACME"}, format="json")
    assert renamed.status_code == 400 and "already exists" in renamed.json()["slug"][0]

    tenant_form = {
        "status": "active",
        "timezone": "UTC",
        "api_keys-TOTAL_FORMS": "0",
        "api_keys-INITIAL_FORMS": "0",
    }
    page = admin_client.post(
        reverse("admin:tenants_tenant_add"), {"name": "Acme4", "slug": "ACME", **tenant_form}
    )
    assert page.status_code == 200
    assert "already exists" in page.context["adminform"].form.errors["slug"][0]
    added = admin_client.post(
        reverse("admin:tenants_tenant_add"), {"name": "Initech", "slug": "IniTech", **tenant_form}
    )
    assert added.status_code == 302

    assert sorted(Tenant.objects.values_list("slug", flat=True)) == ["acme", "globex", "initech"]
    assert Tenant.objects.get(slug="acme").name == "Acme Two"


@pytest.mark.django_db(transaction=True)
def test_lowering_the_slugs_already_there_renames_clashes_instead_of_failing(capsys):
    before, after = (
        ("tenants", "0004_orderings_without_joins"),
        ("tenants", "0006_tenant_slug_lower_case"),
    )
    executor = MigrationExecutor(connection)
    executor.migrate([before])
    try:
        old = executor.loader.project_state([before]).apps.get_model("tenants", "Tenant")
        ids = {s: old.objects.create(slug=s, name=s).pk for s in ("ACME", "acme", "Acme", "Globex")}
        executor = MigrationExecutor(connection)
        executor.migrate([after])
    finally:
        MigrationExecutor(connection).migrate(
            MigrationExecutor(connection).loader.graph.leaf_nodes()
        )
    slugs = dict(Tenant.objects.values_list("pk", "slug"))
    # The slug already lower case keeps it; the others, oldest first, get a suffix.
    assert [slugs[ids[s]] for s in ("ACME", "acme", "Acme", "Globex")] == [
        "acme-2",
        "acme",
        "acme-3",
        "globex",
    ]
    printed = capsys.readouterr().out
    assert "slug 'ACME' is now 'acme-2' ('acme' was taken)" in printed
    assert "slug 'Globex' is now 'globex'." in printed


def test_staff_tokens_are_issued_to_active_staff_users_only(admin_client):
    users = get_user_model().objects
    carol = users.create_user("carol", password="pw-carol-123")
    users.create_user("dave", password="pw-dave-123", is_staff=True, is_active=False)

    with pytest.raises(CommandError) as caught:
        run("staff_token_issue", "carol")
    assert str(caught.value) == (
        "carol is not a staff user: staff tokens are for staff (give carol staff status first)."
    )
    with pytest.raises(CommandError, match="dave is inactive"):
        run("staff_token_issue", "dave")
    page = admin_client.post(
        reverse("admin:tenants_stafftoken_add"), {"user": carol.pk, "name": "c"}
    )
    assert page.status_code == 200
    assert "not a staff user" in page.context["adminform"].form.errors["user"][0]
    assert not StaffToken.objects.exists()

    carol.is_staff = True
    carol.save()
    secret, _ = run("staff_token_issue", "carol")
    assert StaffToken.objects.get(user=carol).prefix in secret


PROVIDER = {"name": "deepseek", "base_url": "https://api.deepseek.com/v1", "timeout_seconds": "60"}


def provider_refusals(admin_client, **fields) -> tuple[str, dict]:
    """What provider_set and the admin's provider form say to these values."""
    options = [f"--{k.replace('_', '-')}={v}" for k, v in fields.items()]
    with pytest.raises(CommandError) as caught:
        run("provider_set", "deepseek", f"--base-url={PROVIDER['base_url']}", *options)
    page = admin_client.post(reverse("admin:routing_provider_add"), {**PROVIDER, **fields})
    assert page.status_code == 200
    assert not Provider.objects.filter(name="deepseek").exists()
    return str(caught.value), page.context["adminform"].form.errors


@pytest.mark.parametrize(
    "value", ["sk-live-abcdef123", "lower case env", "deepseek_api_key", "1PASSWORD", "A-B"]
)
def test_a_provider_key_is_named_by_its_environment_variable_never_pasted(admin_client, value):
    said, errors = provider_refusals(admin_client, api_key_env=value)
    assert said.startswith("Name the environment variable that holds the key")
    assert "not the key itself" in said and value not in said
    assert errors["api_key_env"] == [said]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://api.deepseek.com/v1", "starts with http:// or https://, not ftp://"),
        ("https://user:sk-live-abc@api.deepseek.com/v1", "Leave credentials, a query"),
        ("https://sk-live-abc@api.deepseek.com/v1", "Leave credentials, a query"),
        ("https://api.deepseek.com/v1?api_key=sk-live-abc", "Leave credentials, a query"),
        ("https://api.deepseek.com/v1#sk-live-abc", "Leave credentials, a query"),
    ],
)
def test_a_provider_base_url_is_http_or_https_without_credentials(admin_client, url, message):
    said, errors = provider_refusals(admin_client, base_url=url)
    assert message in said and "sk-live" not in said
    assert message in errors["base_url"][0]


def test_a_provider_with_a_variable_name_or_no_key_is_saved(admin_client):
    run(
        "provider_set",
        "deepseek",
        "--base-url",
        "https://api.deepseek.com/v1",
        "--api-key-env",
        "DEEPSEEK_API_KEY_2",
    )
    run("provider_set", "mock", "--base-url", "http://127.0.0.1:8001/v1", "--api-key-env", "")
    page = admin_client.post(
        reverse("admin:routing_provider_add"), {**PROVIDER, "name": "qwen", "api_key_env": "_QWEN"}
    )
    assert page.status_code == 302
    assert dict(Provider.objects.values_list("name", "api_key_env")) == {
        "deepseek": "DEEPSEEK_API_KEY_2",
        "global-api": "GLOBAL_API_KEY",
        "mock": "",
        "qwen": "_QWEN",
    }


def test_a_body_nested_too_deeply_is_a_400_on_the_management_api(superuser_token):
    client = api(token=superuser_token)
    for depth in (200, 5000):  # past the limit; past what Python's parser can recurse
        response = client.post(
            "/api/tenants/", "[" * depth + "]" * depth, content_type="application/json"
        )
        assert response.status_code == 400, depth
        assert "more than 128 deep" in response.json()["detail"]
    assert not Tenant.objects.exists()


def test_writes_without_the_trailing_slash_reach_the_endpoint(acme, superuser_token):
    client = api(token=superuser_token)
    created = client.post("/api/tenants", {"slug": "zz", "name": "Z"}, format="json")
    assert created.status_code == 201, created.content
    assert Tenant.objects.filter(slug="zz").exists()
    key = api_key_issue(tenant=acme).key
    revoked = client.post(f"/api/keys/{key.prefix}/revoke", format="json")
    assert revoked.status_code == 200, revoked.content
    key.refresh_from_db()
    assert key.revoked_at is not None


@pytest.mark.parametrize("timeout", [1e10, float("nan"), 0, -1])
def test_a_timeout_beyond_an_hour_or_not_a_number_is_refused(acme, superuser_token, timeout):
    with pytest.raises(CommandError, match="at most 3600 seconds"):
        run(
            "provider_set", "slow", "--base-url", "http://127.0.0.1:9/v1", "--timeout", str(timeout)
        )
    assert not Provider.objects.filter(name="slow").exists()
    if timeout != timeout:  # NaN: JSON has none to send
        return
    client = api(token=superuser_token)
    body = {
        "name": "slow",
        "strategy": "fallback",
        "targets": [{"model": "deepseek-v4-flash", "timeout_seconds": timeout}],
    }
    response = client.post("/api/routes/", body, format="json")
    assert response.status_code == 400, response.content
    assert "at most 3600 seconds" in str(response.json())


def test_a_tenant_allowlist_cannot_strand_a_narrowed_key(acme, admin_client, superuser_token):
    flash = CatalogModel.objects.get(public_id="deepseek-v4-flash")
    acme.allowed_models.add(CatalogModel.objects.get(public_id=KIMI))
    narrowed = api_key_issue(tenant=acme, model_ids=[KIMI]).key
    revoked = api_key_issue(tenant=acme, model_ids=[KIMI]).key
    revoked.revoked_at = timezone.now()
    revoked.save()

    with pytest.raises(CommandError) as caught:
        run("tenant_create", "acme", "--models", "deepseek-v4-flash")
    assert f"{narrowed.prefix}… ({KIMI})" in str(caught.value)
    assert revoked.prefix not in str(caught.value)  # a revoked key strands nothing

    client = api(token=superuser_token)
    put = client.put("/api/tenants/acme/models/", {"models": [flash.public_id]}, format="json")
    assert put.status_code == 400 and narrowed.prefix in put.json()["models"][0]
    patch = client.patch("/api/tenants/acme/", {"models": [flash.public_id]}, format="json")
    assert patch.status_code == 400 and narrowed.prefix in patch.json()["models"][0]

    page = admin_client.post(
        reverse("admin:tenants_tenant_change", args=[acme.pk]),
        {
            "name": "Acme",
            "slug": "acme",
            "status": "active",
            "timezone": "UTC",
            "allowed_models": [flash.pk],
        },
    )
    assert page.status_code == 200
    assert narrowed.prefix in page.context["adminform"].form.errors["allowed_models"][0]
    assert set(acme.allowed_models.values_list("public_id", flat=True)) == {
        "deepseek-v4-flash",
        KIMI,
    }
    # Keeping the key's model, or widening the key first, is fine.
    run("tenant_create", "acme", "--models", KIMI)
    assert list(acme.allowed_models.values_list("public_id", flat=True)) == [KIMI]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "   ", "A tenant needs a name, not only spaces."),
        ("alert_webhook_url", "ftp://hooks.example/x", "starts with http:// or https://"),
        ("alert_webhook_url", "https://user:pw@hooks.example/x", "Leave credentials out"),
    ],
)
def test_a_blank_name_or_an_odd_webhook_url_is_refused(superuser_token, field, value, message):
    client = api(token=superuser_token)
    created = client.post("/api/tenants/", {"slug": "zz", "name": "Z", field: value}, format="json")
    assert created.status_code == 400, created.content
    api_message = "may not be blank" if field == "name" else message  # DRF trims first
    assert api_message in created.json()[field][0]
    assert not Tenant.objects.filter(slug="zz").exists()
    if field == "name":  # the shell sets no webhook
        with pytest.raises(CommandError, match=re.escape(message)):
            run("tenant_create", "zz", "--name", value)
        assert not Tenant.objects.filter(slug="zz").exists()


def test_a_service_name_without_a_dot_is_a_url_for_providers_and_webhooks(
    admin_client, superuser_token
):
    """A compose or Kubernetes service (`http://vllm:8000/v1`) was refused as "Enter a
    valid URL.", from the shell, the admin and the API alike."""
    run("provider_set", "vllm", "--base-url", "http://vllm:8000/v1", "--api-key-env", "")
    page = admin_client.post(
        reverse("admin:routing_provider_add"),
        {**PROVIDER, "name": "sglang", "base_url": "http://sglang-router/v1"},
    )
    assert page.status_code == 302
    saved = dict(Provider.objects.values_list("name", "base_url"))
    assert (saved["vllm"], saved["sglang"]) == ("http://vllm:8000/v1", "http://sglang-router/v1")
    client = api(token=superuser_token)
    created = client.post(
        "/api/tenants/",
        {"slug": "zz", "name": "Z", "alert_webhook_url": "http://alerts:9000/tollgate"},
        format="json",
    )
    assert created.status_code == 201, created.content
    assert Tenant.objects.get(slug="zz").alert_webhook_url == "http://alerts:9000/tollgate"
    # What is still no URL: a space, a label that ends in a hyphen, digits alone.
    for url in (
        "http://my host/v1",
        "http://vllm-/v1",
        "http://8000/v1",
        "http://local\thost:8000/v1",
        "http://vllm\n:8000/v1",
    ):
        with pytest.raises(CommandError, match="valid URL"):
            run("provider_set", "bad", "--base-url", url)
        refused = client.post(
            "/api/tenants/", {"slug": "zy", "name": "Y", "alert_webhook_url": url}, format="json"
        )
        assert refused.status_code == 400, url
