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


# --- Refusals in words, never a database constraint's name ------------------------------


def route_form(name: str, targets: list[dict], *, route=None) -> dict:
    """The Route add or change form with its inline targets (`id` for a saved one)."""
    form = {
        "name": name,
        "description": "",
        "strategy": "split",
        "enabled": "on",
        "targets-TOTAL_FORMS": str(len(targets)),
        "targets-INITIAL_FORMS": str(sum("id" in t for t in targets)),
        "targets-MIN_NUM_FORMS": "0",
        "targets-MAX_NUM_FORMS": "1000",
    }
    for index, target in enumerate(targets):
        row = {"position": str(index), "model": "", "subroute": "", "timeout_seconds": ""}
        row |= {"weight": "1", "route": str(route.pk) if route is not None else ""}
        for field, value in (row | target).items():
            form[f"targets-{index}-{field}"] = value
    return form


@pytest.mark.parametrize("page", ["add", "change"])
@pytest.mark.parametrize(
    ("target", "draft", "constraint", "words"),
    [
        (
            {"timeout_seconds": "10"},
            {"model": None, "subroute": None, "timeout_seconds": 10.0},
            "route_target_model_or_route",
            "Choose a model or a route, not both or neither.",
        ),
        (
            {"model": "flash", "subroute": "other"},
            {"model": "flash", "subroute": "other"},
            "route_target_model_or_route",
            "Choose a model or a route, not both or neither.",
        ),
        (
            {"model": "flash", "weight": "0"},
            {"model": "flash", "subroute": None, "weight": 0},
            "route_target_weight_positive",
            "The weight must be a positive whole number.",
        ),
    ],
)
def test_a_wrong_route_target_is_refused_on_its_row_in_words(
    admin_client, page, target, draft, constraint, words
):
    from django.core.exceptions import ValidationError

    from routing.models import Route, RouteTarget
    from routing.routes import TargetDraft, route_targets_validate

    flash = CatalogModel.objects.get(public_id="deepseek-v4-flash")
    other = Route.objects.create(name="other")
    RouteTarget.objects.create(route=other, model=flash)
    named = {"flash": flash, "other": other}
    target = {field: str(getattr(named.get(v), "pk", v)) for field, v in target.items()}
    if page == "add":
        url = reverse("admin:routing_route_add")
        form = route_form("new", [target])
    else:
        route = Route.objects.create(name="new", strategy=Route.Strategy.SPLIT)
        saved = RouteTarget.objects.create(route=route, model=flash, weight=3)
        url = reverse("admin:routing_route_change", args=[route.pk])
        form = route_form("new", [{"id": str(saved.pk), **target}], route=route)

    response = admin_client.post(url, form)

    assert response.status_code == 200
    content = response.content.decode()
    assert words in content
    assert constraint not in content and "Constraint" not in content
    (row,) = response.context["inline_admin_formsets"][0].formset.forms
    assert row.non_field_errors() == [words]
    # The management API says the same of the same target, numbered.
    draft = TargetDraft(**{field: named.get(v, v) for field, v in draft.items()})
    with pytest.raises(ValidationError) as api_refusal:
        route_targets_validate(Route(), [draft])
    assert api_refusal.value.messages == [f"Target 1: {words[0].lower()}{words[1:]}"]
    # Nothing saved: no new route, or the route's target as it was.
    if page == "add":
        assert list(Route.objects.values_list("name", flat=True)) == ["other"]
    else:
        assert list(
            route.targets.values_list("model", "subroute", "weight", "timeout_seconds")
        ) == [(flash.pk, None, 3, None)]
    assert RouteTarget.objects.count() == (1 if page == "add" else 2)


@pytest.mark.parametrize(
    ("scope", "constraint", "words"),
    [
        (
            "tenant",
            "budget_one_per_tenant",
            "This tenant already has a budget of the whole tenant: change that one.",
        ),
        ("key", "budget_one_per_key", "This key already has a budget: change that one."),
    ],
)
def test_a_second_budget_for_the_same_scope_is_refused_in_words(
    admin_client, acme, scope, constraint, words
):
    from tenants.budgets import budget_set
    from tenants.models import Budget

    key = api_key_issue(tenant=acme).key
    budget_set(tenant=acme, limit_usd=Decimal("10"))
    budget_set(tenant=acme, key=key, limit_usd=Decimal("20"))

    response = admin_client.post(
        reverse("admin:tenants_budget_add"),
        {
            "tenant": acme.pk,
            "api_key": key.pk if scope == "key" else "",
            "limit_usd": "5",
            "hard": "on",
            "alert_thresholds": "[50, 80, 100]",
        },
    )

    assert response.status_code == 200
    content = response.content.decode()
    assert response.context["adminform"].form.errors == {"__all__": [words]}
    assert constraint not in content and "Constraint" not in content
    assert set(Budget.objects.values_list("api_key", "limit_usd")) == {
        (None, Decimal("10")),
        (key.pk, Decimal("20")),
    }


@pytest.mark.parametrize(
    ("prices", "constraint", "words"),
    [
        (
            {"markup_percent": "5", "output_per_mtok": "1"},
            "tenant_price_markup_or_prices",
            "Set a markup or negotiated prices, not both.",
        ),
        (
            {},
            "tenant_price_negotiated_names_model_and_output",
            "A negotiated price names a model and sets its output price; a markup may cover "
            "every model.",
        ),
        (
            {"input_per_mtok": "0.1", "output_per_mtok": "1"},
            "tenant_price_negotiated_names_model_and_output",
            "A negotiated price names a model and sets its output price; a markup may cover "
            "every model.",
        ),
    ],
)
def test_a_tenant_price_neither_markup_nor_negotiated_is_refused_in_words(
    admin_client, acme, prices, constraint, words
):
    from billing.models import TenantPrice
    from routing.services import price_change_earliest

    start = price_change_earliest() + timedelta(minutes=5)
    response = admin_client.post(
        reverse("admin:billing_tenantprice_add"),
        {
            "tenant": acme.pk,
            "model": "",
            **prices,
            "effective_from_0": start.strftime("%Y-%m-%d"),
            "effective_from_1": start.strftime("%H:%M:%S"),
        },
    )

    assert response.status_code == 200
    content = response.content.decode()
    assert response.context["adminform"].form.errors == {"__all__": [words]}
    assert constraint not in content and "Constraint" not in content
    assert not TenantPrice.objects.exists()


def _staff(username: str, *codenames: str):
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission
    from django.test import Client

    user = get_user_model().objects.create_user(username, password="pw-12345-staff", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    client = Client()
    client.force_login(user)
    return user, client


def test_a_view_only_staff_user_cannot_run_the_actions_that_change_things(acme):
    from routing.models import CircuitBreaker

    _, viewer = _staff(
        "viewer", "view_tenant", "view_apikey", "view_stafftoken", "view_circuitbreaker"
    )
    key = api_key_issue(tenant=acme).key
    model = CatalogModel.objects.get(public_id="deepseek-v4-flash")
    breaker = CircuitBreaker.objects.create(
        model=model, consecutive_failures=5, open_until=timezone.now() + timedelta(minutes=5)
    )
    for url, action, pk in (
        (reverse("admin:tenants_apikey_changelist"), "revoke", key.pk),
        (reverse("admin:tenants_apikey_changelist"), "rotate", key.pk),
        (reverse("admin:tenants_tenant_changelist"), "suspend", acme.pk),
        (reverse("admin:routing_circuitbreaker_changelist"), "close_breakers", breaker.pk),
    ):
        page = viewer.get(url)
        assert page.status_code == 200
        assert f'value="{action}"' not in page.content.decode(), action
        viewer.post(url, {"action": action, "_selected_action": [pk], "grace_hours": "0"})

    key = ApiKey.objects.get(pk=key.pk)
    assert key.revoked_at is None and key.expires_at is None
    assert ApiKey.objects.count() == 1  # no rotated key issued
    assert Tenant.objects.get(pk=acme.pk).status == Tenant.Status.ACTIVE
    assert CircuitBreaker.objects.get(pk=breaker.pk).open_until is not None


def test_a_staff_user_issues_staff_tokens_for_themselves_only(admin_user):
    operator, client = _staff("tokenop", "add_stafftoken", "view_stafftoken")

    form = client.get(reverse("admin:tenants_stafftoken_add")).context["adminform"].form
    assert list(form.fields["user"].queryset) == [operator]
    page = client.post(
        reverse("admin:tenants_stafftoken_add"), {"user": admin_user.pk, "name": "mine"}
    )
    assert page.status_code == 200 and "user" in page.context["adminform"].form.errors
    assert not StaffToken.objects.exists()
    issued = client.post(
        reverse("admin:tenants_stafftoken_add"), {"user": operator.pk, "name": "mine"}
    )
    assert issued.context["secret"].startswith("tgs-")
    assert StaffToken.objects.get().user == operator


def test_issuing_revoking_and_suspending_leave_history_naming_the_key(admin_client, acme):
    from django.contrib.admin.models import LogEntry

    admin_client.post(reverse("admin:tenants_apikey_add"), {"tenant": acme.pk, "name": "ci"})
    key = ApiKey.objects.get(name="ci")
    admin_client.post(
        reverse("admin:tenants_apikey_changelist"),
        {"action": "revoke", "_selected_action": [key.pk]},
    )
    admin_client.post(
        reverse("admin:tenants_tenant_changelist"),
        {"action": "suspend", "_selected_action": [acme.pk]},
    )

    history = [(e.object_repr, e.get_change_message()) for e in LogEntry.objects.order_by("pk")]
    assert history[0][0] == str(key) and key.prefix in history[0][0]
    assert (str(key), "Revoked.") in history
    assert (str(acme), "Suspended.") in history


def test_a_rate_limit_of_zero_is_refused_in_the_admin_and_the_api(admin_client, acme):
    """0 requests or tokens a minute read as no limit at all, and 0 concurrent requests
    as no call at all: either way not what was typed."""
    from .conftest import api

    key = api_key_issue(tenant=acme, name="ci").key
    for field in ("rpm_limit", "tpm_limit", "concurrency_limit"):
        page = admin_client.post(
            reverse("admin:tenants_apikey_change", args=[key.pk]),
            {"name": "ci", field: "0", "allowed_models": []},
        )
        assert page.status_code == 200, field
        errors = page.context["adminform"].form.errors[field]
        assert errors == ["Ensure this value is greater than or equal to 1."]
    admin_client.logout()
    from django.contrib.auth import get_user_model

    from tenants.services import staff_token_issue

    root = get_user_model().objects.create_superuser("root", password="pw-root-123")
    token = staff_token_issue(user=root, name="t").secret
    answer = api(token=token).post(
        "/api/keys/", {"tenant": "acme", "name": "z", "rpm_limit": 0}, format="json"
    )
    assert answer.status_code == 400 and "rpm_limit" in answer.json()
    assert ApiKey.objects.get(pk=key.pk).rpm_limit is None


@pytest.mark.parametrize(
    "url",
    [
        "admin:tenants_tenant_changelist",
        "admin:tenants_apikey_changelist",
        "admin:billing_invoice_changelist",
        "admin:billing_usageevent_changelist",
        "admin:routing_modelprice_changelist",
    ],
)
def test_a_date_filter_out_of_range_is_an_invalid_filter_not_a_500(admin_client, event, url):
    for query in ("created_at__year=99999", "month__year=0", "recorded_at__year=10000"):
        page = admin_client.get(f"{reverse(url)}?{query}")
        assert page.status_code == 302 and page.url.endswith("?e=1"), (url, query)


def test_an_add_page_prefilled_with_a_date_as_text_loads(admin_client, acme):
    price = admin_client.get(reverse("admin:routing_modelprice_add") + "?effective_from=2026-12-31")
    assert price.status_code == 200
    assert price.context["adminform"].form.initial["effective_from"].date().isoformat() == (
        "2026-12-31"
    )
    for bad in ("abc", "2026-13-45", "99999-01-01", "0001-01-01T00:00:00%2B05:00"):
        page = admin_client.get(reverse("admin:tenants_apikey_add") + f"?expires_at={bad}")
        assert page.status_code == 200, bad
        assert "expires_at" not in page.context["adminform"].form.initial


def test_an_odd_grace_period_is_named_not_taken_for_no_action(admin_client, acme):
    key = api_key_issue(tenant=acme, name="ci").key
    url = reverse("admin:tenants_apikey_changelist")
    for grace in ("abc", "1e12", "-1", "nan", "2161"):
        page = admin_client.post(
            url,
            {"action": "rotate", "_selected_action": [key.pk], "grace_hours": grace},
            follow=True,
        )
        said = [str(m) for m in page.context["messages"]]
        assert said == ["The grace period is a number of hours from 0 to 2160."], grace
    assert ApiKey.objects.get().expires_at is None


def test_a_key_stored_with_a_concurrency_of_zero_is_not_rotated_and_says_why(
    admin_client, acme, superuser_token
):
    from .conftest import api

    key = api_key_issue(tenant=acme, name="ci").key
    ApiKey.objects.filter(pk=key.pk).update(concurrency_limit=0)  # before limits were >= 1
    why = f"{key.prefix}… has a concurrency limit of 0, which no call fits"

    answer = api(token=superuser_token).post(f"/api/keys/{key.prefix}/rotate/", {}, format="json")
    assert answer.status_code == 409 and answer.json()["detail"].startswith(why)
    page = admin_client.post(
        reverse("admin:tenants_apikey_changelist"),
        {"action": "rotate", "_selected_action": [key.pk], "grace_hours": "1"},
        follow=True,
    )
    assert page.status_code == 200
    assert any(str(m).startswith(why) for m in page.context["messages"])
    assert ApiKey.objects.count() == 1
