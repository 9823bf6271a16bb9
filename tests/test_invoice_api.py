"""Invoices through the management API (staff) and at GET /v1/invoices (a tenant's keys)."""

from __future__ import annotations

import csv
import io
import zipfile
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from billing.invoicing import invoice_build, invoice_finalize
from billing.models import Invoice
from routing.models import CatalogModel, ModelPrice
from tenants.services import api_key_issue, tenant_create

from .conftest import api, record

pytestmark = pytest.mark.django_db

OCT = date(2026, 10, 1)
AFTER_OCT = datetime(2026, 11, 2, tzinfo=UTC)


@pytest.fixture
def october(shop):
    """acme's October: 1M output tokens by key a, 0.5M by key b at $1.10 per 1M."""
    tenant, (a, b), model = shop
    record(a, model, datetime(2026, 10, 5, tzinfo=UTC), output=1_000_000)
    record(b, model, datetime(2026, 10, 6, tzinfo=UTC), output=500_000)
    return tenant


def test_the_lifecycle_through_the_api(october, superuser_token):
    client = api(token=superuser_token)

    built = client.post("/api/invoices/build/", {"tenant": "acme", "month": "2026-10"})
    assert built.status_code == 200, built.content
    draft = built.json()
    assert (draft["status"], draft["number"], draft["total"]) == ("draft", None, "1.65")
    assert [(line["bucket"], line["quantity"], line["amount"]) for line in draft["lines"]] == [
        ("output", 1_500_000, "1.65")
    ]
    assert sorted(k["amount"] for k in draft["keys"]) == ["0.55", "1.10"]
    # Building again is idempotent: the same draft.
    again = client.post("/api/invoices/build/", {"tenant": "acme", "month": "2026-10"})
    assert again.json()["id"] == draft["id"] and Invoice.objects.count() == 1

    finalized = client.post(f"/api/invoices/{draft['id']}/finalize/")
    assert finalized.status_code == 200, finalized.content
    number = finalized.json()["number"]
    assert number.startswith("INV-") and finalized.json()["status"] == "finalized"

    url = f"/api/invoices/{draft['id']}/mark-paid/"
    for impossible in ("2026-11-20T10:00Z", "2999-01-01T00:00Z", "yesterday"):
        refused = client.post(url, {"paid_at": impossible})
        assert refused.status_code in (400, 409), impossible  # before issue, future, no date
    issued_at = finalized.json()["finalized_at"]
    paid = client.post(url, {"paid_at": issued_at})
    assert paid.json()["status"] == "paid" and paid.json()["paid_at"] == issued_at

    assert client.post(f"/api/invoices/{draft['id']}/void/", {}).status_code == 400
    void = client.post(f"/api/invoices/{draft['id']}/void/", {"reason": "wrong address"})
    assert (void.json()["status"], void.json()["number"]) == ("void", number)

    correction = client.post(f"/api/invoices/{draft['id']}/correct/")
    assert correction.status_code == 201
    assert correction.json()["corrects"] == number
    assert correction.json()["status"] == "draft" and correction.json()["total"] == "1.65"

    listed = client.get("/api/invoices/?month=2026-10").json()["results"]
    assert [(i["status"], i["number"]) for i in listed] == [("draft", None), ("void", number)]
    assert client.get("/api/invoices/?status=paid").json()["results"] == []


def test_the_api_refuses_to_change_a_finalized_invoice(october, superuser_token):
    invoice = invoice_finalize(invoice=invoice_build(tenant=october, month=OCT), now=AFTER_OCT)
    client = api(token=superuser_token)
    url = f"/api/invoices/{invoice.pk}/"

    assert client.patch(url, {"total": "0.01"}, format="json").status_code == 405
    assert client.put(url, {"total": "0.01"}, format="json").status_code == 405
    assert client.delete(url).status_code == 405
    # Finalizing again changes nothing; paying twice is refused.
    assert client.post(f"{url}finalize/").json()["number"] == invoice.number
    client.post(f"{url}mark-paid/")
    refused = client.post(f"{url}mark-paid/")
    assert refused.status_code == 409 and "Only a finalized invoice" in refused.json()["detail"]
    stored = Invoice.objects.get(pk=invoice.pk)
    assert (stored.total, stored.number) == (Decimal("1.65"), invoice.number)


def test_finalize_refuses_unpriced_usage_and_months_not_over(shop, superuser_token):
    _, (key, _), model = shop
    ModelPrice.objects.filter(model=model).update(input_per_mtok=None, cached_input_per_mtok=None)
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), input_uncached=100, output=10)
    client = api(token=superuser_token)
    draft = client.post("/api/invoices/build/", {"tenant": "acme", "month": "2026-10"}).json()

    refused = client.post(f"/api/invoices/{draft['id']}/finalize/")
    assert refused.status_code == 409
    assert "have no price" in refused.json()["detail"]
    this_month = f"{datetime.now(UTC):%Y-%m}"
    current = client.post("/api/invoices/build/", {"tenant": "acme", "month": this_month}).json()
    early = client.post(f"/api/invoices/{current['id']}/finalize/")
    assert early.status_code == 409 and "has not ended yet" in early.json()["detail"]
    assert not Invoice.objects.exclude(status="draft").exists()

    bad = client.post("/api/invoices/build/", {"tenant": "acme", "month": "October"})
    assert bad.status_code == 400 and "month" in bad.json()
    assert client.get("/api/invoices/?month=13-2026").status_code == 400
    assert client.get("/api/invoices/?status=late").status_code == 400


def test_build_refuses_a_month_not_started_yet_and_previews_the_current_one(shop, superuser_token):
    client = api(token=superuser_token)
    now = datetime.now(UTC)
    this_month = date(now.year, now.month, 1)
    next_month = (this_month + timedelta(days=31)).replace(day=1)

    for month in (f"{next_month:%Y-%m}", "9998-12"):
        refused = client.post("/api/invoices/build/", {"tenant": "acme", "month": month})
        assert refused.status_code == 400, month
        assert refused.json() == {
            "month": [f"{month} has not started yet in acme's time zone (UTC)."]
        }
    assert not Invoice.objects.exists()  # no empty draft left behind

    preview = client.post(
        "/api/invoices/build/", {"tenant": "acme", "month": f"{this_month:%Y-%m}"}
    )
    assert preview.status_code == 200, preview.content
    assert preview.json()["status"] == "draft"


def test_a_month_starts_for_the_build_in_the_tenants_time_zone(shop, superuser_token, monkeypatch):
    tenant_create(slug="kiri", name="Kiri", model_ids=["m"], timezone_name="Pacific/Kiritimati")
    tenant_create(slug="la", name="LA", model_ids=["m"], timezone_name="America/Los_Angeles")
    client = api(token=superuser_token)

    def build(slug: str, at: datetime):
        monkeypatch.setattr(timezone, "now", lambda: at)
        return client.post("/api/invoices/build/", {"tenant": slug, "month": "2026-12"})

    # November 30th, 12:00 UTC: December 1st, 02:00 on Kiritimati (UTC+14).
    before_utc = datetime(2026, 11, 30, 12, tzinfo=UTC)
    assert build("kiri", before_utc).status_code == 200
    refused = build("acme", before_utc)
    assert (refused.status_code, list(refused.json())) == (400, ["month"])
    # December 1st, 05:00 UTC: still November 30th in Los Angeles.
    after_utc = datetime(2026, 12, 1, 5, tzinfo=UTC)
    assert build("acme", after_utc).status_code == 200
    refused = build("la", after_utc)
    assert refused.json() == {
        "month": ["2026-12 has not started yet in la's time zone (America/Los_Angeles)."]
    }
    assert sorted(Invoice.objects.values_list("tenant__slug", flat=True)) == ["acme", "kiri"]


def test_finalize_accepts_unpriced_usage_with_a_reason_superusers_only(shop, superuser_token):
    _, (key, _), model = shop
    ModelPrice.objects.filter(model=model).update(input_per_mtok=None, cached_input_per_mtok=None)
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), input_uncached=100, output=1_000_000)
    client = api(token=superuser_token)
    draft = client.post("/api/invoices/build/", {"tenant": "acme", "month": "2026-10"}).json()
    url = f"/api/invoices/{draft['id']}/finalize/"

    refused = client.post(url, {}, format="json")
    assert refused.status_code == 409 and '"accept_unpriced"' in refused.json()["detail"]
    for blank in ("", "   "):
        empty = client.post(url, {"accept_unpriced": blank}, format="json")
        assert empty.status_code == 400 and "accept_unpriced" in empty.json()
    member = get_user_model().objects.create_user("alice", password="pw-alice-123")
    shop[0].members.add(member)
    as_member = api(member).post(url, {"accept_unpriced": "fine by me"}, format="json")
    assert as_member.status_code == 403
    assert Invoice.objects.get(pk=draft["id"]).status == "draft"

    accepted = client.post(url, {"accept_unpriced": "No input prices yet"}, format="json")

    assert accepted.status_code == 200, accepted.content
    body = accepted.json()
    assert body["status"] == "finalized" and body["number"] == "INV-2026-000001"
    assert (body["total"], body["unpriced_tokens"]) == ("1.10", 100)
    assert (body["unpriced_accepted"], body["unpriced_accepted_by"]) == (
        "No input prices yet",
        "root",
    )
    assert sorted(
        (line["bucket"], line["unit_price"], line["amount"]) for line in body["lines"]
    ) == [
        ("input", None, "0.00"),
        ("output", "1.100000", "1.10"),
    ]


def test_downloads_in_every_format_add_up(october, superuser_token):
    invoice = invoice_finalize(invoice=invoice_build(tenant=october, month=OCT), now=AFTER_OCT)
    client = api(token=superuser_token)
    downloads = client.get(f"/api/invoices/{invoice.pk}/").json()["downloads"]
    assert set(downloads) == {"csv", "json", "html", "pdf"}

    for fmt, content_type in (
        ("csv", "text/csv"),
        ("json", "application/json"),
        ("html", "text/html"),
        ("pdf", "application/pdf"),
    ):
        response = client.get(downloads[fmt])
        assert response.status_code == 200
        assert response["Content-Type"].startswith(content_type)
        assert response["Content-Disposition"] == (f'attachment; filename="{invoice.number}.{fmt}"')
    rows = csv.DictReader(io.StringIO(client.get(downloads["csv"]).content.decode("utf-8-sig")))
    assert sum(Decimal(r["amount"]) for r in rows) == invoice.total
    assert client.get(f"/api/invoices/{invoice.pk}/download/xlsx/").status_code == 404

    month = client.get("/api/invoices/export/json/?month=2026-10")
    assert month["Content-Disposition"] == 'attachment; filename="invoices-2026-10-json.zip"'
    names = zipfile.ZipFile(io.BytesIO(month.content)).namelist()
    assert sorted(names) == [f"{invoice.number}.json", "summary.csv"]
    assert client.get("/api/invoices/export/json/").status_code == 400


def test_the_month_export_takes_the_tenant_slug_in_any_case(october, superuser_token):
    invoice = invoice_finalize(invoice=invoice_build(tenant=october, month=OCT), now=AFTER_OCT)
    other = tenant_create(slug="other", name="Other", model_ids=["m"])
    other_key = api_key_issue(tenant=other, name="o").key
    model = CatalogModel.objects.get(public_id="m")
    record(other_key, model, datetime(2026, 10, 7, tzinfo=UTC), output=2_000_000)
    invoice_finalize(invoice=invoice_build(tenant=other, month=OCT), now=AFTER_OCT)
    client = api(token=superuser_token)

    for slug in ("acme", "ACME", "Acme"):
        month = client.get("/api/invoices/export/csv/", {"month": "2026-10", "tenant": slug})
        names = zipfile.ZipFile(io.BytesIO(month.content)).namelist()
        assert sorted(names) == [f"{invoice.number}.csv", "summary.csv"], slug
    nobody = client.get("/api/invoices/export/csv/", {"month": "2026-10", "tenant": "NOBODY"})
    assert zipfile.ZipFile(io.BytesIO(nobody.content)).namelist() == ["summary.csv"]


def test_members_read_and_download_but_only_superusers_change(october, superuser_token):
    invoice = invoice_finalize(invoice=invoice_build(tenant=october, month=OCT), now=AFTER_OCT)
    member = get_user_model().objects.create_user("alice", password="pw-alice-123")
    october.members.add(member)
    client = api(member)

    assert client.get(f"/api/invoices/{invoice.pk}/").json()["number"] == invoice.number
    assert client.get(f"/api/invoices/{invoice.pk}/download/pdf/").status_code == 200
    assert client.post(f"/api/invoices/{invoice.pk}/void/", {"reason": "x"}).status_code == 403
    assert client.post(f"/api/invoices/{invoice.pk}/mark-paid/").status_code == 403
    built = client.post("/api/invoices/build/", {"tenant": "acme", "month": "2026-11"})
    assert built.status_code == 403
    assert Invoice.objects.get(pk=invoice.pk).status == "finalized"


def test_keys_list_and_download_their_own_issued_invoices_only(october):
    invoice = invoice_finalize(invoice=invoice_build(tenant=october, month=OCT), now=AFTER_OCT)
    invoice_build(tenant=october, month=date(2026, 11, 1))  # a draft: not shown to keys
    other = tenant_create(slug="other", name="Other", model_ids=["m"])
    other_key = api_key_issue(tenant=other, name="o").key
    record(
        other_key,
        CatalogModel.objects.get(public_id="m"),
        datetime(2026, 10, 7, tzinfo=UTC),
        output=2_000_000,
    )
    foreign = invoice_finalize(invoice=invoice_build(tenant=other, month=OCT), now=AFTER_OCT)
    mine = api(token=api_key_issue(tenant=october, name="reader").secret)

    listed = mine.get("/v1/invoices").json()
    assert listed["object"] == "list"
    assert [(i["id"], i["total"], i["status"]) for i in listed["data"]] == [
        (invoice.number, "1.65", "finalized")
    ]
    detail = mine.get(f"/v1/invoices/{invoice.number}").json()
    assert detail["total"] == "1.65" and len(detail["lines"]) == 1
    pdf = mine.get(listed["data"][0]["downloads"]["pdf"])
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF-")

    for url in (f"/v1/invoices/{foreign.number}", f"/v1/invoices/{foreign.number}/csv"):
        refused = mine.get(url)
        assert refused.status_code == 404
        assert refused.json()["error"]["type"] == "invalid_request_error"
        assert foreign.number in refused.json()["error"]["message"]
        assert "2.20" not in refused.content.decode()
    assert mine.get(f"/v1/invoices/{invoice.number}/xlsx").status_code == 404
    assert api().get("/v1/invoices").status_code == 401
    # The management API stays closed to tenant keys.
    assert mine.get("/api/invoices/").status_code == 401


def test_odd_input_gets_a_clear_error_not_a_crash(october, superuser_token):
    staff = api(token=superuser_token)
    key = api(token=api_key_issue(tenant=october, name="reader").secret)

    for url in ("/api/invoices/?tenant=%00", "/api/usage/?model=a%00b", "/api/invoices/%00/"):
        response = staff.get(url)
        assert response.status_code == 400 and "NUL" in response.json()["detail"], url
    for url in ("/v1/invoices/%00", "/v1/invoices/INV-2026-000001%00/csv"):
        response = key.get(url)
        assert response.status_code == 400, url
        assert response.json()["error"]["type"] == "invalid_request_error"
    for number in ("x" * 500, "INV-2026-1", "' OR 1=1 --", "..%2F..%2Fetc"):
        response = key.get(f"/v1/invoices/{number}")
        assert response.status_code == 404, number
        assert len(response.json()["error"]["message"]) < 100
    for month in ("9999-12", "0001-01", "2026-1-1", ""):
        built = staff.post("/api/invoices/build/", {"tenant": "acme", "month": month})
        assert built.status_code == 400, month
    assert staff.get("/api/invoices/?month=9999-12").status_code == 400
    assert staff.get("/api/invoices/export/csv/?month=0001-01").status_code == 400
    assert staff.get("/api/invoices/nope/").status_code == 404
    assert not Invoice.objects.exists()
