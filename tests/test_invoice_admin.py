"""Invoices in the staff console: read-only pages, the lifecycle as actions, downloads."""

from __future__ import annotations

import io
import zipfile
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.urls import reverse

from billing.invoicing import invoice_build
from billing.models import Invoice

from .conftest import record

pytestmark = pytest.mark.django_db

OCT = date(2026, 10, 1)
CHANGELIST = reverse("admin:billing_invoice_changelist")


@pytest.fixture
def draft(shop):
    tenant, (a, b), model = shop
    record(a, model, datetime(2026, 10, 5, tzinfo=UTC), output=1_000_000)
    record(b, model, datetime(2026, 10, 6, tzinfo=UTC), input_uncached=2_000_000)
    return invoice_build(tenant=tenant, month=OCT)


def act(admin_client, action: str, *invoices, **extra):
    return admin_client.post(
        CHANGELIST,
        {"action": action, "_selected_action": [i.pk for i in invoices], "index": 0, **extra},
        follow=action.startswith("zip") is False,
    )


def test_the_lifecycle_as_admin_actions(admin_client, draft):
    act(admin_client, "finalize", draft)
    draft.refresh_from_db()
    assert draft.status == "finalized" and draft.number.startswith("INV-")

    # Voiding needs a reason: without one, nothing happens and the admin says why.
    page = act(admin_client, "void", draft)
    assert "Say why the invoice is void" in page.content.decode()
    assert Invoice.objects.get(pk=draft.pk).status == "finalized"

    act(admin_client, "mark_paid", draft)
    assert Invoice.objects.get(pk=draft.pk).status == "paid"
    act(admin_client, "void", draft, reason="billed to the wrong entity")
    voided = Invoice.objects.get(pk=draft.pk)
    assert (voided.status, voided.number, voided.void_reason) == (
        "void",
        draft.number,
        "billed to the wrong entity",
    )
    act(admin_client, "correct", voided)
    correction = Invoice.objects.get(corrects=voided)
    assert correction.status == "draft" and correction.total == voided.total == Decimal("1.64")
    again = act(admin_client, "correct", voided).content.decode()
    assert "Corrected" not in again and f"it is corrected already, by {correction}" in again
    # Each step is in the invoice's history, with who did it.
    from django.contrib.admin.models import LogEntry

    steps = LogEntry.objects.filter(object_id=str(draft.pk)).order_by("pk")
    assert [e.get_change_message() for e in steps] == [
        "Finalized.",
        "Marked paid.",
        "Voided.",
        "Corrected.",
    ]


def test_a_finalized_invoice_is_read_only_in_the_admin(admin_client, draft):
    act(admin_client, "finalize", draft)
    change_url = reverse("admin:billing_invoice_change", args=[draft.pk])

    page = admin_client.get(change_url)
    assert page.status_code == 200
    body = page.content.decode()
    assert 'name="_save"' not in body  # view only: no save button
    assert "1.10" in body and "0.54" in body  # the lines, and the keys' amounts
    assert admin_client.post(change_url, {"total": "0.01"}).status_code == 403
    delete_url = reverse("admin:billing_invoice_delete", args=[draft.pk])
    assert admin_client.get(delete_url).status_code == 403
    assert admin_client.post(delete_url, {"post": "yes"}).status_code == 403
    assert "delete_selected" not in admin_client.get(CHANGELIST).content.decode()
    # Rebuilding or finalizing again is refused, with the reason shown.
    page = act(admin_client, "rebuild", draft)
    assert "it is finalized, not a draft" in page.content.decode()
    stored = Invoice.objects.get(pk=draft.pk)
    assert (stored.total, stored.status) == (Decimal("1.64"), "finalized")
    assert reverse("admin:billing_invoice_add") not in admin_client.get(CHANGELIST).content.decode()


def test_a_draft_can_be_deleted_and_rebuilt(admin_client, draft):
    delete_url = reverse("admin:billing_invoice_delete", args=[draft.pk])
    assert admin_client.post(delete_url, {"post": "yes"}).status_code == 302
    assert not Invoice.objects.exists()


def test_downloads_one_by_one_and_as_a_zip(admin_client, draft):
    act(admin_client, "finalize", draft)
    draft.refresh_from_db()
    listing = admin_client.get(CHANGELIST).content.decode()
    for fmt in ("csv", "json", "html", "pdf"):
        url = reverse("admin:billing_invoice_download", args=[draft.pk, fmt])
        assert url in listing
        response = admin_client.get(url)
        assert response.status_code == 200
        assert response["Content-Disposition"] == f'attachment; filename="{draft.number}.{fmt}"'
    missing = reverse("admin:billing_invoice_download", args=[draft.pk, "xlsx"])
    assert admin_client.get(missing).status_code == 404

    response = act(admin_client, "zip_pdf", draft)
    assert response["Content-Type"] == "application/zip"
    assert response["Content-Disposition"] == 'attachment; filename="invoices-2026-10-pdf.zip"'
    names = zipfile.ZipFile(io.BytesIO(response.content)).namelist()
    assert sorted(names) == [f"{draft.number}.pdf", "summary.csv"]


def test_building_and_closing_a_month_from_the_admin(admin_client, shop):
    tenant, (a, _), model = shop
    record(a, model, datetime(2026, 10, 5, tzinfo=UTC), output=1_000_000)
    url = reverse("admin:billing_invoice_close_month")
    assert url in admin_client.get(CHANGELIST).content.decode()

    assert (
        "not a month like 2026-10" in admin_client.post(url, {"month": "2026-13"}).content.decode()
    )
    built = admin_client.post(url, {"month": "2026-10", "build": "1"}).content.decode()
    assert "draft built" in built
    assert Invoice.objects.get(tenant=tenant).status == "draft"

    closed = admin_client.post(url, {"month": "2026-10", "finalize": "1"}).content.decode()
    invoice = Invoice.objects.get(tenant=tenant)
    assert invoice.status == "finalized" and invoice.number in closed and "1.10" in closed
    # Closing again changes nothing.
    again = admin_client.post(url, {"month": "2026-10", "finalize": "1"}).content.decode()
    assert "already numbered" in again
    assert Invoice.objects.get(tenant=tenant).number == invoice.number


def test_no_draft_is_built_or_numbered_for_a_tenant_without_usage(admin_client, shop):
    from tenants.services import tenant_create

    _, (a, _), model = shop
    record(a, model, datetime(2026, 10, 5, tzinfo=UTC), output=1_000_000)
    idle = tenant_create(slug="idle", name="Idle")
    url = reverse("admin:billing_invoice_close_month")

    built = admin_client.post(url, {"month": "2026-10", "build": "1"}).content.decode()

    assert "no usage" in built
    assert list(Invoice.objects.values_list("tenant__slug", flat=True)) == ["acme"]
    empty = invoice_build(tenant=idle, month=OCT)  # through the API's build, say
    page = act(admin_client, "finalize", empty).content.decode()
    assert "idle has no usage to bill in 2026-10: nothing to number" in page
    assert Invoice.objects.get(pk=empty.pk).number is None


def test_the_admin_builds_no_draft_of_a_month_not_started(admin_client, shop):
    tenant, _, _ = shop
    url = reverse("admin:billing_invoice_close_month")
    page = admin_client.post(url, {"month": "2099-01", "build": "1"}).content.decode()
    assert "not built: 2099-01 has not started yet" in page
    assert not Invoice.objects.filter(tenant=tenant).exists()


def test_staff_without_superuser_rights_read_but_do_not_act(client, draft):
    staff = get_user_model().objects.create_user("finance", password="pw-fin-123", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_invoice"))
    client.force_login(staff)

    listing = client.get(CHANGELIST).content.decode()
    assert "zip_csv" in listing and '"finalize"' not in listing
    act(client, "finalize", draft)
    assert Invoice.objects.get(pk=draft.pk).status == "draft"
    assert client.get(reverse("admin:billing_invoice_close_month")).status_code == 403
    download = reverse("admin:billing_invoice_download", args=[draft.pk, "csv"])
    assert client.get(download).status_code == 200


def test_finalizing_unpriced_usage_asks_why_on_a_confirmation_page(admin_client, client, shop):
    tenant, (a, _), model = shop
    model.prices.update(input_per_mtok=None, cached_input_per_mtok=None)
    record(a, model, datetime(2026, 10, 5, tzinfo=UTC), input_uncached=100, output=1_000_000)
    draft = invoice_build(tenant=tenant, month=OCT, now=datetime(2026, 11, 2, tzinfo=UTC))

    page = act(admin_client, "finalize", draft).content.decode()
    assert "have no price" in page and "--accept-unpriced" in page  # refused by default
    page = act(admin_client, "finalize_accepting_unpriced", draft).content.decode()
    assert "Finalize, accepting unpriced usage unbilled" in page
    assert "<td>100</td><td>m</td>" in page and 'name="reason"' in page
    blank = act(admin_client, "finalize_accepting_unpriced", draft, confirm="yes", reason=" ")
    assert "This field is required" in blank.content.decode()
    assert Invoice.objects.get(pk=draft.pk).status == "draft"
    staff = get_user_model().objects.create_user("finance", password="pw-fin-123", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_invoice"))
    client.force_login(staff)
    act(client, "finalize_accepting_unpriced", draft, confirm="yes", reason="mine")
    assert Invoice.objects.get(pk=draft.pk).status == "draft"  # superusers only

    done = act(
        admin_client, "finalize_accepting_unpriced", draft, confirm="yes", reason="No input prices"
    ).content.decode()

    stored = Invoice.objects.get(pk=draft.pk)
    assert (stored.status, stored.total, stored.unpriced_accepted, stored.unpriced_accepted_by) == (
        "finalized",
        Decimal("1.10"),
        "No input prices",
        "admin",
    )
    assert "Finalized 1 invoice(s)" in done
    assert "100 tokens (m) are not billed: they have no price" in done
    change = admin_client.get(reverse("admin:billing_invoice_change", args=[draft.pk]))
    assert "No input prices" in change.content.decode()


def test_the_admins_own_pages_lead_back_like_djangos_pages(admin_client):
    # Home > app > model > page, as on Django's own change pages.
    for page, app, changelist in (
        ("admin:billing_invoice_close_month", "billing", "admin:billing_invoice_changelist"),
        ("routing_health", "routing", "admin:routing_catalogmodel_changelist"),
    ):
        html = admin_client.get(reverse(page)).content.decode()
        crumbs = html.split('<div class="breadcrumbs">')[1].split("</div>")[0]
        assert reverse("admin:index") in crumbs
        assert reverse("admin:app_list", kwargs={"app_label": app}) in crumbs
        assert reverse(changelist) in crumbs


def test_a_void_reason_too_long_is_named_not_taken_for_no_action(admin_client, draft):
    act(admin_client, "finalize", draft)
    page = act(admin_client, "void", draft, reason="x" * 600).content.decode()
    assert "Say why the invoice is void in 500 characters at most." in page
    assert Invoice.objects.get(pk=draft.pk).status == "finalized"


def test_invoices_filter_by_the_months_invoiced(admin_client, shop):
    tenant, (a, _), model = shop
    record(a, model, datetime(2026, 9, 5, tzinfo=UTC), output=1_000_000)
    record(a, model, datetime(2026, 10, 5, tzinfo=UTC), output=2_000_000)
    september = invoice_build(tenant=tenant, month=date(2026, 9, 1))
    invoice_build(tenant=tenant, month=OCT)

    page = admin_client.get(CHANGELIST)
    choices = [c["display"] for c in page.context["cl"].filter_specs[1].choices(page.context["cl"])]
    assert choices == ["All", "2026-10", "2026-09"]
    shown = admin_client.get(f"{CHANGELIST}?month=2026-09").context["cl"].result_list
    assert list(shown) == [september]
    assert not admin_client.get(f"{CHANGELIST}?month=2026-13").context["cl"].result_list
