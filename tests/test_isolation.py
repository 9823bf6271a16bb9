"""A tenant never sees or touches another tenant's data: through its keys on /v1/, and
through the management API, where every endpoint answers 401 to strangers, 404 to
outsiders and 200 to the tenant's own members (NetBox-style checks for every endpoint)."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model

from billing.invoicing import invoice_build
from billing.metering import TokenBuckets
from billing.models import Invoice, UsageEvent
from billing.services import usage_record
from routing.models import CatalogModel, Provider
from tenants.budgets import budget_set
from tenants.models import ApiKey, Budget, Tenant
from tenants.services import api_key_issue, tenant_create

from .conftest import api, model_create, usage_facts

pytestmark = pytest.mark.django_db


@pytest.fixture
def two_tenants():
    provider = Provider.objects.create(name="p", base_url="http://127.0.0.1:9/v1")
    shared = model_create("shared-model", provider=provider)
    only_a = model_create("only-a", provider=provider)
    a = tenant_create(slug="alpha", name="Alpha", model_ids=["shared-model", "only-a"])
    b = tenant_create(slug="beta", name="Beta", model_ids=["shared-model"])
    key_a = api_key_issue(tenant=a, name="a").key
    key_b = api_key_issue(tenant=b, name="b").key
    for tenant, key in ((a, key_a), (b, key_b)):
        event = usage_record(usage_facts(key, shared, request_id=f"req_{tenant.slug}"))
        invoice_build(tenant=tenant, month=event.occurred_at.date().replace(day=1))
    return {"a": a, "b": b, "key_a": key_a, "key_b": key_b, "only_a": only_a}


@pytest.fixture
def member_of_a(two_tenants):
    user = get_user_model().objects.create_user("alice", password="pw-alice-123")
    two_tenants["a"].members.add(user)
    return user


def detail_urls(t) -> dict[str, str]:
    return {
        "tenant": f"/api/tenants/{t['b'].slug}/",
        "allowlist": f"/api/tenants/{t['b'].slug}/models/",
        "key": f"/api/keys/{t['key_b'].prefix}/",
        "usage": f"/api/usage/{UsageEvent.objects.get(tenant=t['b']).pk}/",
        "invoice": f"/api/invoices/{Invoice.objects.get(tenant=t['b']).pk}/",
        "invoice file": f"/api/invoices/{Invoice.objects.get(tenant=t['b']).pk}/download/csv/",
    }


def test_every_endpoint_refuses_strangers(two_tenants):
    lists = ["/api/tenants/", "/api/keys/", "/api/usage/", "/api/invoices/"]
    for url in [*lists, *detail_urls(two_tenants).values()]:
        assert api().get(url).status_code == 401, url


def test_tenant_api_keys_do_not_open_the_management_api(two_tenants):
    secret = api_key_issue(tenant=two_tenants["a"]).secret
    assert api(token=secret).get("/api/tenants/").status_code == 401


def test_outsider_gets_404_for_every_object_of_another_tenant(two_tenants, member_of_a):
    client = api(member_of_a)
    for name, url in detail_urls(two_tenants).items():
        assert client.get(url).status_code == 404, name
    assert client.post(f"/api/keys/{two_tenants['key_b'].prefix}/revoke/").status_code == 404
    assert ApiKey.objects.get(pk=two_tenants["key_b"].pk).revoked_at is None
    invoice = Invoice.objects.get(tenant=two_tenants["b"])
    assert client.post(f"/api/invoices/{invoice.pk}/finalize/").status_code in (403, 404)


def test_lists_show_only_the_members_own_tenant(two_tenants, member_of_a):
    client = api(member_of_a)
    assert [t["slug"] for t in client.get("/api/tenants/").json()["results"]] == ["alpha"]
    keys = client.get("/api/keys/").json()["results"]
    assert {k["tenant"] for k in keys} == {"alpha"}
    usage = client.get("/api/usage/").json()["results"]
    assert [u["request_id"] for u in usage] == ["req_alpha"]
    # Asking by slug for the other tenant's rows yields nothing, not its rows.
    assert client.get("/api/usage/?tenant=beta").json()["results"] == []
    assert client.get("/api/keys/?tenant=beta").json()["results"] == []
    invoices = client.get("/api/invoices/").json()["results"]
    assert [i["tenant"] for i in invoices] == ["alpha"]
    assert client.get("/api/invoices/?tenant=beta").json()["results"] == []


def test_a_tenant_slug_names_its_tenant_in_any_case_everywhere_the_api_takes_one(
    two_tenants, superuser_token
):
    # Slugs are stored lower case and the shell takes them in any case; so does the API:
    # in a body, in the URL and in the filters.
    client = api(token=superuser_token)
    assert client.get("/api/tenants/ALPHA/").json()["slug"] == "alpha"
    assert client.get("/api/tenants/Alpha/models/").json() == {"models": ["only-a", "shared-model"]}
    assert client.get("/api/tenants/ALPHA/webhook-secret/").json()["secret"].startswith("whsec_")
    renamed = client.patch("/api/tenants/ALPHA/", {"name": "Alpha Inc"}, format="json")
    assert renamed.status_code == 200 and Tenant.objects.get(slug="alpha").name == "Alpha Inc"

    issued = client.post("/api/keys/", {"tenant": "ALPHA", "name": "upper"}, format="json")
    assert issued.status_code == 201, issued.content
    assert ApiKey.objects.get(prefix=issued.json()["prefix"]).tenant == two_tenants["a"]
    budget = client.post("/api/budgets/", {"tenant": "Alpha", "limit_usd": "5"}, format="json")
    assert budget.status_code == 201, budget.content
    assert Budget.objects.get(pk=budget.json()["id"]).tenant == two_tenants["a"]
    invoice = Invoice.objects.get(tenant=two_tenants["a"])
    built = client.post(
        "/api/invoices/build/", {"tenant": "ALPHA", "month": f"{invoice.month:%Y-%m}"}
    )
    assert built.status_code == 200, built.content
    assert built.json()["id"] == invoice.pk  # the same draft, rebuilt

    for url in ("/api/usage/", "/api/keys/", "/api/invoices/"):
        lower = client.get(url, {"tenant": "alpha"}).json()
        assert lower["count"] > 0 and {r["tenant"] for r in lower["results"]} == {"alpha"}, url
        assert client.get(url, {"tenant": "ALPHA"}).json() == lower, url

    route = {"name": "r", "strategy": "fallback", "targets": [{"model": "shared-model"}]}
    assert client.post("/api/routes/", route, format="json").status_code == 201
    hello = {"messages": [{"role": "user", "content": "hi"}]}
    explained = client.post("/api/routes/r/explain/?tenant=ALPHA", hello, format="json")
    assert explained.json()["as"]["tenant"] == "alpha"


def test_a_slug_in_another_case_opens_no_other_tenant(two_tenants, member_of_a):
    # What a member of alpha gets for beta, it gets for BETA; and a slug no tenant has
    # lists nothing, as a model no event has does.
    client = api(member_of_a)
    for slug in ("BETA", "Beta"):
        for url in (
            f"/api/tenants/{slug}/",
            f"/api/tenants/{slug}/models/",
            f"/api/tenants/{slug}/webhook-secret/",
        ):
            assert client.get(url).status_code == 404, url
        refused = client.post("/api/keys/", {"tenant": slug, "name": "sneaky"}, format="json")
        assert refused.json() == {"tenant": ["Object with slug=beta does not exist."]}
        for url in ("/api/usage/", "/api/keys/", "/api/invoices/"):
            listed = client.get(url, {"tenant": slug})
            assert (listed.status_code, listed.json()["count"]) == (200, 0), url
    assert not ApiKey.objects.filter(name="sneaky").exists()
    for filters in ({"tenant": "NOBODY"}, {"tenant": "nobody"}, {"model": "no-such-model"}):
        listed = client.get("/api/usage/", filters)
        assert (listed.status_code, listed.json()["count"]) == (200, 0), filters
    assert client.get("/api/usage/", {"tenant": "ALPHA"}).json()["count"] == 1


def test_member_cannot_issue_a_key_for_another_tenant(two_tenants, member_of_a):
    response = api(member_of_a).post("/api/keys/", {"tenant": "beta", "name": "sneaky"})
    assert response.status_code == 400
    assert "tenant" in response.json()
    assert not ApiKey.objects.filter(name="sneaky").exists()


def test_member_reads_its_own_objects(two_tenants, member_of_a):
    client = api(member_of_a)
    assert client.get("/api/tenants/alpha/").status_code == 200
    assert client.get(f"/api/keys/{two_tenants['key_a'].prefix}/").status_code == 200
    event = UsageEvent.objects.get(tenant=two_tenants["a"])
    body = client.get(f"/api/usage/{event.pk}/").json()
    assert body["cost"] == str(event.cost)  # decimals travel as strings


def test_member_cannot_change_tenants_or_allowlists(two_tenants, member_of_a):
    client = api(member_of_a)
    assert client.patch("/api/tenants/alpha/", {"name": "Mine"}).status_code == 403
    assert (
        client.put("/api/tenants/alpha/models/", {"models": []}, format="json").status_code == 403
    )
    assert client.post("/api/tenants/alpha/suspend/").status_code == 403
    assert client.post("/api/tenants/", {"slug": "gamma", "name": "G"}).status_code == 403


def test_a_members_refused_write_is_told_what_only_superusers_may_do(two_tenants, member_of_a):
    client = api(member_of_a)
    invoice = Invoice.objects.get(tenant=two_tenants["a"])
    refusals = {
        "/api/invoices/build/": "Only superusers may build, finalize, void, correct or mark paid "
        "invoices.",
        f"/api/invoices/{invoice.pk}/finalize/": "Only superusers may build, finalize, void, "
        "correct or mark paid invoices.",
        "/api/budgets/": "Only superusers may change budgets.",
        "/api/tenants/": "Only superusers may change tenants.",
    }
    for url, message in refusals.items():
        response = client.post(url, {"tenant": "alpha", "month": "2026-10", "limit_usd": "5"})
        assert (response.status_code, response.json()) == (403, {"detail": message}), url
    refused = client.put("/api/tenants/alpha/models/", {"models": []}, format="json")
    assert refused.json() == {"detail": "Only superusers may change tenants."}


def test_v1_models_of_one_tenant_never_list_anothers(live_server, two_tenants):
    import openai

    secret_b = api_key_issue(tenant=two_tenants["b"]).secret
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=secret_b, max_retries=0)
    assert [m.id for m in client.models.list()] == ["shared-model"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("only-a")


def test_a_tenant_created_through_the_api_keeps_every_field_it_was_given(superuser_token):
    created = api(token=superuser_token).post(
        "/api/tenants/",
        {
            "slug": "delta",
            "name": "Delta",
            "contact_email": "ops@delta.test",
            "timezone": "Asia/Tokyo",
            "alert_webhook_url": "https://hooks.delta.test/tollgate",
        },
        format="json",
    )
    assert created.status_code == 201, created.content
    tenant = Tenant.objects.get(slug="delta")
    assert (tenant.contact_email, tenant.timezone, tenant.alert_webhook_url) == (
        "ops@delta.test",
        "Asia/Tokyo",
        "https://hooks.delta.test/tollgate",
    )
    assert created.json()["alert_webhook_url"] == "https://hooks.delta.test/tollgate"


def test_superuser_token_manages_everything(two_tenants, superuser_token):
    client = api(token=superuser_token)
    assert {t["slug"] for t in client.get("/api/tenants/").json()["results"]} == {"alpha", "beta"}

    created = client.post(
        "/api/tenants/",
        {"slug": "gamma", "name": "Gamma", "models": ["shared-model"]},
        format="json",
    )
    assert created.status_code == 201, created.content
    assert created.json()["models"] == ["shared-model"]

    allow = client.put(
        "/api/tenants/gamma/models/", {"models": ["shared-model", "only-a"]}, format="json"
    )
    assert allow.json() == {"models": ["only-a", "shared-model"]}
    unknown = client.put("/api/tenants/gamma/models/", {"models": ["nope"]}, format="json")
    assert unknown.status_code == 400

    issued = client.post("/api/keys/", {"tenant": "gamma", "name": "ci"}, format="json")
    assert issued.status_code == 201
    secret = issued.json()["secret"]
    assert secret.startswith("tg-")
    prefix = issued.json()["prefix"]
    # The secret is never shown again.
    assert "secret" not in client.get(f"/api/keys/{prefix}/").json()
    assert secret not in str(list(ApiKey.objects.values()))

    revoked = client.post(f"/api/keys/{prefix}/revoke/")
    assert revoked.json()["state"] == "revoked"

    suspended = client.post("/api/tenants/gamma/suspend/")
    assert suspended.json()["status"] == "suspended"


def test_usage_filters_validate_their_input(two_tenants, superuser_token):
    client = api(token=superuser_token)
    assert client.get("/api/usage/?since=yesterday").status_code == 400
    assert client.get("/api/usage/?status=weird").status_code == 400
    assert (
        client.get("/api/usage/?model=shared-model&since=2000-01-01T00:00:00Z").json()["count"] == 2
    )
    total = sum(Decimal(u["cost"]) for u in client.get("/api/usage/").json()["results"])
    assert total == sum(e.cost for e in UsageEvent.objects.all())


def test_usage_filters_by_request_id_every_attempt_of_one_call(two_tenants, member_of_a):
    # A routed call that fell back: two rows under the request id its client got.
    shared = CatalogModel.objects.get(public_id="shared-model")
    key = two_tenants["key_a"]
    failed = usage_facts(
        key,
        shared,
        request_id="req_routed",
        attempt=1,
        settles=False,
        status=UsageEvent.Status.UPSTREAM_ERROR,
        buckets=TokenBuckets(),
    )
    usage_record(failed)
    usage_record(usage_facts(key, shared, request_id="req_routed", attempt=2))
    client = api(member_of_a)

    rows = client.get("/api/usage/", {"request_id": "req_routed"}).json()["results"]
    assert sorted((r["request_id"], r["attempt"], r["status"]) for r in rows) == [
        ("req_routed", 1, "upstream_error"),
        ("req_routed", 2, "ok"),
    ]
    assert client.get("/api/usage/", {"request_id": "req_alpha"}).json()["count"] == 1
    # Exact, and within the tenants the user may see.
    assert client.get("/api/usage/", {"request_id": "req_rout"}).json()["count"] == 0
    assert client.get("/api/usage/", {"request_id": "req_beta"}).json()["count"] == 0


def test_the_schema_documents_the_request_id_filter_of_the_usage_list(superuser_token):
    schema = api(token=superuser_token).get("/api/schema/?format=json").json()
    parameters = {p["name"]: p for p in schema["paths"]["/api/usage/"]["get"]["parameters"]}
    assert {"tenant", "model", "status", "since", "until", "request_id"} <= set(parameters)
    request_id = parameters["request_id"]
    assert (request_id["in"], request_id["schema"]["type"]) == ("query", "string")
    assert "x-request-id" in request_id["description"]


@pytest.mark.parametrize(
    "value",
    [
        "2026-13-45T00:00:00Z",  # no such month or day
        "2026-02-30T00:00:00Z",
        "2026-01-01T25:00:00Z",
        "2026-01-01T00:00:00+99:00",  # no such offset
        "0001-01-01T00:00:00+01:00",  # before the year 1 in UTC
        "9999-12-31T23:59:59-01:00",  # after the year 9999 in UTC
    ],
)
@pytest.mark.parametrize("name", ["since", "until"])
def test_usage_date_filters_out_of_range_are_a_400_not_a_crash(
    two_tenants, superuser_token, name, value
):
    response = api(token=superuser_token).get("/api/usage/", {name: value})
    assert response.status_code == 400
    assert list(response.json()) == [name]


def test_openapi_schema_is_published(superuser_token):
    response = api(token=superuser_token).get("/api/schema/?format=json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert "/api/keys/{prefix}/revoke/" in paths
    assert "/api/tenants/{slug}/models/" in paths
    assert "/v1/chat/completions" not in paths


def test_the_schema_describes_what_the_api_answers(superuser_token):
    # What a client generated from the schema parses: months as YYYY-MM strings, a key's
    # replaced_by as null until it is rotated, each download's own media type.
    schema = api(token=superuser_token).get("/api/schema/?format=json").json()
    components = schema["components"]["schemas"]
    for name, field in [
        ("Invoice", "month"),
        ("InvoiceDetail", "month"),
        ("InvoiceLine", "usage_month"),
    ]:
        month = components[name]["properties"][field]
        assert (month["type"], month.get("format")) == ("string", None), name
        assert re.fullmatch(month["pattern"], "2026-10")
    assert components["ApiKey"]["properties"]["replaced_by"]["nullable"] is True
    download = schema["paths"]["/api/invoices/{id}/download/{fmt}/"]["get"]
    assert set(download["responses"]["200"]["content"]) == {
        "text/csv",
        "application/json",
        "text/html",
        "application/pdf",
    }


def test_budgets_and_limits_through_the_management_api(two_tenants, superuser_token):
    client = api(token=superuser_token)
    key_a = two_tenants["key_a"]

    created = client.post(
        "/api/budgets/",
        {"tenant": "alpha", "limit_usd": "25.00", "alert_thresholds": [50, 90]},
        format="json",
    )
    assert created.status_code == 201, created.content
    body = created.json()
    assert (body["limit_usd"], body["hard"], body["alert_thresholds"]) == (
        "25.000000",
        True,
        [50, 90],
    )
    # The month's usage so far already counts: 10 input tokens at $0.27 and 5 output
    # tokens at $1.10 per 1M.
    assert body["spent_usd"] == "0.000008200000"
    again = client.post("/api/budgets/", {"tenant": "alpha", "limit_usd": "30"}, format="json")
    assert again.json()["id"] == body["id"]  # the tenant's budget, changed in place
    refused = client.post(
        "/api/budgets/",
        {"tenant": "alpha", "api_key": two_tenants["key_b"].prefix, "limit_usd": "1"},
        format="json",
    )
    assert refused.status_code == 400 and "another tenant" in str(refused.json())

    limits = client.patch(
        f"/api/keys/{key_a.prefix}/",
        {"rpm_limit": 60, "tpm_limit": 10000, "concurrency_limit": 4, "tenant": "beta"},
        format="json",
    )
    assert limits.status_code == 200, limits.content
    key_a.refresh_from_db()
    assert (key_a.rpm_limit, key_a.tpm_limit, key_a.concurrency_limit) == (60, 10000, 4)
    assert key_a.tenant.slug == "alpha"  # a key never changes tenant

    rotated = client.post(f"/api/keys/{key_a.prefix}/rotate/", {"grace_seconds": 60}, format="json")
    assert rotated.status_code == 201
    new = rotated.json()
    assert new["secret"].startswith("tg-") and new["rpm_limit"] == 60
    assert client.get(f"/api/keys/{key_a.prefix}/").json()["replaced_by"] == new["prefix"]

    secret = client.get("/api/tenants/alpha/webhook-secret/").json()["secret"]
    assert secret.startswith("whsec_")


def test_a_budget_update_changes_that_budget_only_never_its_tenant_or_key(
    two_tenants, superuser_token
):
    client = api(token=superuser_token)
    tenant_budget = budget_set(tenant=two_tenants["a"], limit_usd=Decimal("1000"))
    key_budget = budget_set(
        tenant=two_tenants["a"], key=two_tenants["key_a"], limit_usd=Decimal("20"), hard=False
    )
    beta_budget = budget_set(tenant=two_tenants["b"], limit_usd=Decimal("50"))

    def scopes():
        return sorted(
            Budget.objects.values_list("pk", "tenant__slug", "api_key__prefix", "limit_usd", "hard")
        )

    before = scopes()
    prefix = two_tenants["key_a"].prefix
    moves = [
        ("patch", key_budget, {"api_key": None}, "api_key"),
        ("patch", beta_budget, {"tenant": "alpha"}, "tenant"),
        ("patch", tenant_budget, {"api_key": prefix}, "api_key"),
        ("put", key_budget, {"tenant": "alpha", "api_key": None, "limit_usd": "5"}, "api_key"),
        ("put", beta_budget, {"tenant": "alpha", "limit_usd": "5"}, "tenant"),
    ]
    for method, budget, body, field in moves:
        response = getattr(client, method)(f"/api/budgets/{budget.pk}/", body, format="json")
        assert response.status_code == 400, (method, body, response.content)
        assert field in response.json(), (method, body)
        assert scopes() == before, (method, body)  # nothing rewritten, nothing created

    patched = client.patch(f"/api/budgets/{key_budget.pk}/", {"limit_usd": "25"}, format="json")
    assert patched.status_code == 200, patched.content
    assert (patched.json()["id"], patched.json()["api_key"]) == (key_budget.pk, prefix)
    put = client.put(
        f"/api/budgets/{key_budget.pk}/",
        {"tenant": "alpha", "api_key": prefix, "limit_usd": "30", "hard": True},
        format="json",
    )
    assert put.status_code == 200, put.content
    assert (put.json()["id"], put.json()["limit_usd"], put.json()["hard"]) == (
        key_budget.pk,
        "30.000000",
        True,
    )
    assert scopes() == sorted(
        [
            (tenant_budget.pk, "alpha", None, Decimal("1000"), True),
            (key_budget.pk, "alpha", prefix, Decimal("30"), True),
            (beta_budget.pk, "beta", None, Decimal("50"), True),
        ]
    )


def test_members_read_but_do_not_set_budgets_and_never_see_other_tenants(
    two_tenants, member_of_a, superuser_token
):
    admin = api(token=superuser_token)
    for slug in ("alpha", "beta"):
        admin.post("/api/budgets/", {"tenant": slug, "limit_usd": "10"}, format="json")
    client = api(member_of_a)

    listed = client.get("/api/budgets/").json()["results"]
    assert [b["tenant"] for b in listed] == ["alpha"]
    beta_budget = two_tenants["b"].budgets.get()
    assert client.get(f"/api/budgets/{beta_budget.pk}/").status_code == 404
    assert client.post("/api/budgets/", {"tenant": "alpha", "limit_usd": "99"}).status_code == 403
    assert client.get("/api/tenants/beta/webhook-secret/").status_code == 404
    assert client.post(f"/api/keys/{two_tenants['key_b'].prefix}/rotate/").status_code == 404
