"""The staff console: every page loads, a key's secret is shown once, prices are versioned,
the ledger is read-only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from billing.metering import TokenBuckets
from billing.models import UsageEvent
from billing.services import usage_record
from routing.models import CatalogModel, ModelPrice
from routing.services import model_price_set
from tenants.models import ApiKey, StaffToken, Tenant
from tenants.services import api_key_issue, key_digest, tenant_create

from .conftest import usage_facts

pytestmark = pytest.mark.django_db


@pytest.fixture
def acme():
    return tenant_create(slug="acme", name="Acme", model_ids=["deepseek-v4-flash"])


@pytest.fixture
def event(acme):
    model = CatalogModel.objects.get(public_id="deepseek-v4-flash")
    key = api_key_issue(tenant=acme).key
    return usage_record(
        usage_facts(
            key,
            model,
            request_id="req_admin",
            buckets=TokenBuckets(input_uncached=100, output=40),
            streamed=True,
            latency_ms=250,
            ttft_ms=40,
        )
    )


@pytest.mark.parametrize(
    "name",
    [
        "tenants_tenant",
        "tenants_apikey",
        "tenants_stafftoken",
        "routing_provider",
        "routing_catalogmodel",
        "routing_modelprice",
        "billing_usageevent",
        "billing_tenantprice",
        "billing_invoice",
    ],
)
def test_every_changelist_and_add_page_loads(admin_client, event, name):
    assert admin_client.get(reverse(f"admin:{name}_changelist")).status_code == 200
    add = admin_client.get(reverse(f"admin:{name}_add"))
    built_not_typed = ("billing_usageevent", "billing_invoice")
    assert add.status_code == (403 if name in built_not_typed else 200)


def test_change_pages_load(admin_client, event, acme):
    model = CatalogModel.objects.get(public_id="Qwen/Qwen3-32B")
    for url in [
        reverse("admin:tenants_tenant_change", args=[acme.pk]),
        reverse("admin:tenants_apikey_change", args=[event.api_key_id]),
        reverse("admin:routing_catalogmodel_change", args=[model.pk]),
        reverse("admin:billing_usageevent_change", args=[event.pk]),
    ]:
        assert admin_client.get(url).status_code == 200, url


def test_issuing_a_key_shows_the_secret_once_and_stores_only_its_digest(admin_client, acme):
    response = admin_client.post(
        reverse("admin:tenants_apikey_add"), {"tenant": acme.pk, "name": "from admin"}
    )

    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    key = ApiKey.objects.get(name="from admin")
    secret = response.context["secret"]
    assert secret.startswith(key.prefix)
    assert secret in response.content.decode()
    assert key.digest == key_digest(secret)
    assert secret not in str(ApiKey.objects.filter(pk=key.pk).values().get())
    # Nowhere to be seen afterwards.
    change = admin_client.get(reverse("admin:tenants_apikey_change", args=[key.pk]))
    assert secret not in change.content.decode()
    assert (
        secret not in admin_client.get(reverse("admin:tenants_apikey_changelist")).content.decode()
    )


def test_issuing_a_staff_token_in_the_admin(admin_client, admin_user):
    response = admin_client.post(
        reverse("admin:tenants_stafftoken_add"), {"user": admin_user.pk, "name": "automation"}
    )
    token = StaffToken.objects.get(name="automation")
    assert response.context["secret"].startswith("tgs-")
    assert token.digest == key_digest(response.context["secret"])


def test_revoke_action_and_no_deletion(admin_client, acme):
    key = api_key_issue(tenant=acme).key
    admin_client.post(
        reverse("admin:tenants_apikey_changelist"),
        {"action": "revoke", "_selected_action": [key.pk]},
    )
    assert ApiKey.objects.get(pk=key.pk).revoked_at is not None
    delete = admin_client.get(reverse("admin:tenants_apikey_delete", args=[key.pk]))
    assert delete.status_code == 403


def test_suspend_and_resume_actions(admin_client, acme):
    url = reverse("admin:tenants_tenant_changelist")
    admin_client.post(url, {"action": "suspend", "_selected_action": [acme.pk]})
    assert Tenant.objects.get(pk=acme.pk).status == Tenant.Status.SUSPENDED
    admin_client.post(url, {"action": "resume", "_selected_action": [acme.pk]})
    assert Tenant.objects.get(pk=acme.pk).status == Tenant.Status.ACTIVE


def test_catalog_shows_unset_input_prices_as_unset(admin_client):
    page = admin_client.get(reverse("admin:routing_catalogmodel_changelist")).content.decode()
    assert "unset" in page
    assert "unset (refuses calls)" in page  # GLM-4.6V
    assert "$0.25" in page


def test_setting_a_price_in_the_admin_opens_a_new_version(admin_client):
    model = CatalogModel.objects.get(public_id="deepseek-v4-flash")
    start = timezone.now() + timedelta(minutes=5)
    response = admin_client.post(
        reverse("admin:routing_modelprice_add"),
        {
            "model": model.pk,
            "input_per_mtok": "0.07",
            "cached_input_per_mtok": "",
            "output_per_mtok": "0.25",
            "effective_from_0": start.strftime("%Y-%m-%d"),
            "effective_from_1": start.strftime("%H:%M:%S"),
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    versions = list(model.prices.order_by("effective_from"))
    assert len(versions) == 2
    assert versions[0].effective_to == versions[1].effective_from
    assert versions[1].input_per_mtok == Decimal("0.07")
    # Versions cannot be edited in place.
    assert (
        admin_client.post(
            reverse("admin:routing_modelprice_change", args=[versions[0].pk]),
            {"output_per_mtok": "9"},
        ).status_code
        == 403
    )
    assert ModelPrice.objects.get(pk=versions[0].pk).output_per_mtok == Decimal("0.25")
    # Each version's page opens, read-only, with its prices shown.
    page = admin_client.get(reverse("admin:routing_modelprice_change", args=[versions[0].pk]))
    assert page.status_code == 200
    assert "0.25" in page.content.decode()


def test_a_scheduled_price_can_be_withdrawn_in_the_admin_but_history_cannot(admin_client):
    model = CatalogModel.objects.get(public_id="deepseek-v4-flash")
    current = model.prices.get()
    soon = model_price_set(
        model=model,
        input_per_mtok=None,
        output_per_mtok=Decimal("1000"),  # a typo, scheduled
        effective_from=timezone.now() + timedelta(hours=1),
    )
    never = model_price_set(
        model=model,
        input_per_mtok=None,
        output_per_mtok=Decimal("0.25"),
        effective_from=datetime(9999, 12, 31, tzinfo=UTC),
    )
    delete = "admin:routing_modelprice_delete"
    # Only the latest can go: the one before it ends where the latest starts.
    assert admin_client.get(reverse(delete, args=[soon.pk])).status_code == 403
    response = admin_client.post(reverse(delete, args=[never.pk]), {"post": "yes"})
    assert response.status_code == 302
    assert admin_client.post(reverse(delete, args=[soon.pk]), {"post": "yes"}).status_code == 302

    assert list(model.prices.all()) == [current]
    current.refresh_from_db()
    assert current.effective_to is None  # in force again, open-ended
    # The version in force is history: it cannot be withdrawn.
    assert admin_client.get(reverse(delete, args=[current.pk])).status_code == 403


def test_a_price_starting_in_the_past_is_refused_in_the_form(admin_client, event):
    model = event.served_model
    before = event.occurred_at - timedelta(seconds=1)
    response = admin_client.post(
        reverse("admin:routing_modelprice_add"),
        {
            "model": model.pk,
            "output_per_mtok": "0.30",
            "effective_from_0": before.strftime("%Y-%m-%d"),
            "effective_from_1": before.strftime("%H:%M:%S"),
        },
    )
    assert response.status_code == 200
    assert "must start at or after" in response.content.decode()
    assert model.prices.count() == 1


@pytest.mark.parametrize("field", ["input_per_mtok", "cached_input_per_mtok", "output_per_mtok"])
def test_a_negative_price_is_refused_on_its_field_in_words(admin_client, field):
    model = CatalogModel.objects.get(public_id="deepseek-v4-flash")
    start = timezone.now() + timedelta(minutes=5)
    response = admin_client.post(
        reverse("admin:routing_modelprice_add"),
        {
            "model": model.pk,
            "output_per_mtok": "0.25",
            field: "-1",
            "effective_from_0": start.strftime("%Y-%m-%d"),
            "effective_from_1": start.strftime("%H:%M:%S"),
        },
    )
    assert response.status_code == 200
    assert response.context["adminform"].form.errors == {
        field: ["A price is not negative: USD per 1M tokens, 0 or more."]
    }
    assert "Constraint" not in response.content.decode()
    assert model.prices.count() == 1


def test_usage_ledger_is_filterable_and_read_only(admin_client, event):
    url = reverse("admin:billing_usageevent_changelist")
    page = admin_client.get(url, {"tenant__id__exact": event.tenant_id}).content.decode()
    assert "0.000010000000" in page  # 40 output tokens at $0.25 per 1M
    day = event.occurred_at
    by_day = admin_client.get(
        url,
        {
            "occurred_at__day": day.day,
            "occurred_at__month": day.month,
            "occurred_at__year": day.year,
        },
    )
    assert by_day.status_code == 200 and "0.000010000000" in by_day.content.decode()
    other_day = admin_client.get(url, {"occurred_at__year": day.year - 1})
    assert "0.000010000000" not in other_day.content.decode()
    response = admin_client.post(
        reverse("admin:billing_usageevent_change", args=[event.pk]), {"output_tokens": 1}
    )
    assert response.status_code == 403
    assert UsageEvent.objects.get(pk=event.pk).output_tokens == 40


def test_budget_status_shows_on_the_tenant_and_key_pages(admin_client, event, acme):
    from tenants.budgets import budget_set

    budget_set(tenant=acme, limit_usd=Decimal("0.0001"))
    key = ApiKey.objects.get(pk=event.api_key_id)
    budget_set(tenant=acme, key=key, limit_usd=Decimal("5"), hard=False)

    tenant_page = admin_client.get(reverse("admin:tenants_tenant_change", args=[acme.pk]))
    # 40 output tokens at $0.25 per 1M: $0.00001 of $0.0001.
    assert "$0.00001 of $0.0001 spent (10.0%)" in tenant_page.content.decode()
    key_page = admin_client.get(reverse("admin:tenants_apikey_change", args=[key.pk]))
    content = key_page.content.decode()
    assert "$0.00001 of $5.00 spent (0.0%)" in content
    assert "soft budget" in content
    assert "Requests per minute" in content


def test_rotating_keys_in_the_admin_shows_the_new_secrets_once(admin_client, acme):
    old = api_key_issue(tenant=acme, name="ci", rpm_limit=60).key
    response = admin_client.post(
        reverse("admin:tenants_apikey_changelist"),
        {"action": "rotate", "_selected_action": [old.pk], "grace_hours": "2"},
    )
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    ((_, issued),) = response.context["rotated"]
    assert issued.secret in response.content.decode()
    old.refresh_from_db()
    assert old.replaced_by == issued.key
    assert abs(old.expires_at - (timezone.now() + timedelta(hours=2))) < timedelta(minutes=1)
    assert (issued.key.name, issued.key.rpm_limit) == ("ci", 60)
    assert key_digest(issued.secret) == issued.key.digest


def test_budgets_are_set_through_the_admin(admin_client, acme):
    other = tenant_create(slug="other", name="Other")
    foreign_key = api_key_issue(tenant=other).key
    url = reverse("admin:tenants_budget_add")
    refused = admin_client.post(
        url,
        {"tenant": acme.pk, "api_key": foreign_key.pk, "limit_usd": "10", "hard": "on",
         "alert_thresholds": "[50, 80, 100]"},
    )  # fmt: skip
    assert "belongs to another tenant" in refused.content.decode()
    saved = admin_client.post(
        url,
        {"tenant": acme.pk, "limit_usd": "10", "hard": "on", "alert_thresholds": "[50, 90]"},
    )
    assert saved.status_code == 302
    budget = acme.budgets.get()
    assert (budget.limit_usd, budget.hard, budget.alert_thresholds) == (
        Decimal("10"),
        True,
        [50, 90],
    )
    for name in ("tenants_budget", "tenants_budgetalert", "tenants_webhookdelivery"):
        assert admin_client.get(reverse(f"admin:{name}_changelist")).status_code == 200


def test_a_catalog_model_cannot_take_a_routes_name(admin_client):
    from routing.models import Provider, Route

    Route.objects.create(name="r1", strategy=Route.Strategy.FALLBACK)
    page = admin_client.post(
        reverse("admin:routing_catalogmodel_add"),
        {
            "public_id": "r1",
            "display_name": "R1",
            "family": "X",
            "developer": "X",
            "provider": Provider.objects.first().pk,
            "upstream_model_id": "r1",
            "context_window": 128000,
            "max_output_tokens": 8192,
            "modalities": ["text"],
            "enabled": "on",
        },
    )
    assert page.status_code == 200
    errors = page.context["adminform"].form.errors
    assert "is the name of a route" in errors["public_id"][0]
    assert not CatalogModel.objects.filter(public_id="r1").exists()
