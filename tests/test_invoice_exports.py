"""Invoice exports (CSV, JSON, HTML, PDF, a month's ZIP) as finance receives them: each
adds up to the stored total exactly."""

from __future__ import annotations

import csv
import io
import json
import re
import zipfile
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from html import escape
from html.parser import HTMLParser

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from billing.exports import _pdf, invoice_document, invoice_export, invoices_zip
from billing.invoicing import invoice_build, invoice_finalize
from billing.models import Invoice, TenantPrice
from tenants.models import Tenant

from .conftest import record

pytestmark = pytest.mark.django_db

OCT = date(2026, 10, 1)
NOV = date(2026, 11, 1)
AFTER_OCT = datetime(2026, 11, 2, tzinfo=UTC)
AFTER_NOV = datetime(2026, 12, 2, tzinfo=UTC)


@pytest.fixture
def issued(shop):
    """October (list price, then a negotiated one from the 20th, two keys) and November
    (with a late October call as an adjustment), both finalized. Amounts with odd cents."""
    tenant, (a, b), model = shop
    Tenant.objects.filter(pk=tenant.pk).update(name="Acmé 阿里 Labs", contact_email="ap@acme.test")
    negotiated = TenantPrice.objects.create(
        tenant=tenant,
        model=model,
        input_per_mtok=Decimal("0.25"),
        cached_input_per_mtok=Decimal("0.05"),
        output_per_mtok=Decimal("0.905"),
        effective_from=datetime(2026, 10, 20, tzinfo=UTC),
    )
    at = datetime(2026, 10, 3, tzinfo=UTC)
    record(a, model, at, input_uncached=333_333, input_cached=123_457, output=777_777)
    record(b, model, at, input_uncached=1_000_001, output=5, reasoning=4)
    record(a, model, at.replace(day=21), tenant_price=negotiated, output=1_234_567)
    record(b, model, at.replace(day=22), tenant_price=negotiated, output=3_333_333)
    october = invoice_finalize(invoice=invoice_build(tenant=tenant, month=OCT), now=AFTER_OCT)
    record(
        a,
        model,
        at.replace(day=30),
        recorded_at=AFTER_OCT + timedelta(hours=2),
        tenant_price=negotiated,
        output=2_000_001,
    )
    record(b, model, datetime(2026, 11, 3, tzinfo=UTC), tenant_price=negotiated, input_cached=7)
    november = invoice_finalize(invoice=invoice_build(tenant=tenant, month=NOV), now=AFTER_NOV)
    return october, november


def test_csv_has_one_row_per_line_adding_up_to_the_total(issued):
    october, november = issued
    for invoice in issued:
        export = invoice_export(invoice, "csv")
        rows = list(csv.DictReader(io.StringIO(export.content.decode("utf-8-sig"))))

        assert export.filename == f"{invoice.number}.csv"
        assert len(rows) == invoice.lines.count()
        assert sum(Decimal(r["amount"]) for r in rows) == invoice.total
        assert {r["invoice"] for r in rows} == {invoice.number}
        for row in rows:
            assert int(row["quantity"]) > 0
            exact = Decimal(row["amount_exact"])
            assert Decimal(row["amount"]) == exact.quantize(Decimal("0.01"), ROUND_HALF_UP)
            assert exact == int(row["quantity"]) * Decimal(row["unit_price_per_1m"]) / 10**6
    october_rows = list(
        csv.DictReader(io.StringIO(invoice_export(october, "csv").content.decode("utf-8-sig")))
    )
    # Two price versions of the output bucket: the list price, then the negotiated one.
    output = sorted(
        (r["unit_price_per_1m"], r["quantity"]) for r in october_rows if r["bucket"] == "output"
    )
    assert output == [("0.905", "4567900"), ("1.10", "777786")]
    november_rows = list(
        csv.DictReader(io.StringIO(invoice_export(november, "csv").content.decode("utf-8-sig")))
    )
    assert [(r["usage_month"], r["adjustment"]) for r in november_rows] == [
        ("2026-10", "yes"),
        ("2026-11", "no"),
    ]


def test_json_keeps_every_amount_a_string_and_adds_up(issued):
    october, _ = issued
    document = json.loads(invoice_export(october, "json").content)

    assert document["number"] == october.number
    assert document["tenant"]["name"] == "Acmé 阿里 Labs"
    assert document["total"] == str(october.total)
    for line in document["lines"]:
        assert isinstance(line["amount"], str) and isinstance(line["amount_exact"], str)
        assert isinstance(line["unit_price_per_1m"], str) and isinstance(line["quantity"], int)
    assert sum(Decimal(line["amount"]) for line in document["lines"]) == october.total
    # The per-key breakdown adds up to the same total, and to the same tokens.
    assert sum(Decimal(k["amount"]) for k in document["keys"]) == october.total
    assert sum(sum(k["tokens"].values()) for k in document["keys"]) == sum(
        line["quantity"] for line in document["lines"]
    )
    assert {k["name"] for k in document["keys"]} == {"a", "b"}


class _Cells(HTMLParser):
    """The text of every <td class="num"> in the usage table's body, row by row."""

    def __init__(self):
        super().__init__()
        self.tables, self.rows, self.cell, self.section = 0, [], None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables += 1
        elif tag in ("tbody", "tfoot"):
            self.section = tag
        elif tag == "tr" and self.tables == 1 and self.section == "tbody":
            self.rows.append([])
        elif tag == "td" and self.tables == 1 and self.section == "tbody":
            self.cell = ""

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None:
            self.rows[-1].append(self.cell.strip())
            self.cell = None
        elif tag in ("tbody", "tfoot"):
            self.section = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def test_printable_html_shows_each_line_and_the_total(issued):
    _, november = issued
    for invoice in issued:
        page = invoice_export(invoice, "html").content.decode()
        cells = _Cells()
        cells.feed(page)

        assert len(cells.rows) == invoice.lines.count()
        assert sum(Decimal(row[-1]) for row in cells.rows) == invoice.total
        assert re.search(rf'id="total">{re.escape(str(invoice.total))}<', page)
        assert f"Invoice {invoice.number}" in page
        assert "Acmé 阿里 Labs" in page
        assert "@page" in page  # print layout: A4, margins, headers repeated
    assert "(adjustment)" in invoice_export(november, "html").content.decode()


def test_pdf_is_a_pdf_with_the_lines_and_the_total(issued):
    october, _ = issued
    export = invoice_export(october, "pdf")
    assert export.content.startswith(b"%PDF-") and export.content_type == "application/pdf"

    text = _pdf(invoice_document(october), compress=False).decode("latin-1")
    assert f"(Total {october.total} USD)" in text
    for line in october.lines.all():
        assert f"({line.amount})" in text
    # Outside Latin-1 (the core PDF font), characters become "?" instead of failing.
    assert "Acm\\351 ?? Labs" in text or "Acm\xe9 ?? Labs" in text


def test_a_draft_exports_as_a_draft(shop):
    tenant, (key, _), model = shop
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), output=1_000_000)
    draft = invoice_build(tenant=tenant, month=OCT, now=AFTER_OCT)

    export = invoice_export(draft, "json")
    assert export.filename == "draft-acme-2026-10.json"
    assert json.loads(export.content)["number"] is None
    assert "Draft invoice" in invoice_export(draft, "html").content.decode()


def test_every_export_says_which_tokens_were_not_billed_and_why(shop):
    tenant, (key, _), model = shop
    model.prices.update(input_per_mtok=None, cached_input_per_mtok=None)
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), input_uncached=1234, output=1_000_000)
    reason = "Input prices unpublished; agreed with Acme"
    invoice = invoice_finalize(
        invoice=invoice_build(tenant=tenant, month=OCT, now=AFTER_OCT),
        now=AFTER_OCT,
        accept_unpriced=reason,
        accepted_by="root",
    )
    note = (
        f"1234 tokens (m) are not billed: they have no price; accepted unbilled by root: {reason}"
    )

    document = json.loads(invoice_export(invoice, "json").content)
    assert (document["unpriced_tokens"], document["unpriced_note"]) == (1234, note)
    assert (document["unpriced_accepted"], document["unpriced_accepted_by"]) == (reason, "root")
    assert document["total"] == "1.10"
    rows = list(
        csv.DictReader(io.StringIO(invoice_export(invoice, "csv").content.decode("utf-8-sig")))
    )
    unpriced = [r for r in rows if not r["unit_price_per_1m"]]
    assert [(r["quantity"], r["amount"], r["note"]) for r in unpriced] == [
        ("1234", "0.00", f"no price: not billed. {note}")
    ]
    assert sum(Decimal(r["amount"]) for r in rows) == invoice.total
    html = invoice_export(invoice, "html").content.decode()
    assert f'id="unpriced">Unpriced usage: {escape(note)}.<' in html
    pdf = _pdf(invoice_document(invoice), compress=False).decode("latin-1")
    assert "Unpriced usage: 1234 tokens \\(m\\) are not billed: they have no price" in pdf
    assert "accepted unbilled by root: Input prices" in pdf and "agreed with Acme." in pdf
    summary = zipfile.ZipFile(io.BytesIO(invoices_zip([invoice], "pdf").content))
    (row,) = csv.DictReader(io.StringIO(summary.read("summary.csv").decode("utf-8-sig")))
    assert (row["total"], row["unpriced_tokens"], row["unpriced_note"]) == ("1.10", "1234", note)


def test_a_month_of_invoices_as_one_zip(issued, shop):
    october, _ = issued
    export = invoices_zip([october], "csv", name="invoices-2026-10")
    archive = zipfile.ZipFile(io.BytesIO(export.content))

    assert export.filename == "invoices-2026-10-csv.zip"
    assert sorted(archive.namelist()) == [f"{october.number}.csv", "summary.csv"]
    summary = list(csv.DictReader(io.StringIO(archive.read("summary.csv").decode("utf-8-sig"))))
    assert summary == [
        {
            "invoice": october.number,
            "tenant": "acme",
            "month": "2026-10",
            "status": "finalized",
            "total": str(october.total),
            "currency": "USD",
            "counts": "yes",
            "corrects": "",
            "file": f"{october.number}.csv",
            "unpriced_tokens": "0",
            "unpriced_note": "",
        }
    ]


@pytest.mark.parametrize("fmt", ["csv", "json", "html", "pdf"])
def test_export_invoices_writes_the_months_zip(issued, tmp_path, fmt, capsys):
    october, _ = issued
    call_command("export_invoices", "2026-10", "--format", fmt, "--out", str(tmp_path / "out"))

    path = tmp_path / "out" / f"invoices-2026-10-{fmt}.zip"
    assert capsys.readouterr().out.strip() == str(path)
    names = zipfile.ZipFile(path).namelist()
    assert sorted(names) == [f"{october.number}.{fmt}", "summary.csv"]


def test_export_invoices_refuses_bad_input_and_empty_months(issued, tmp_path):
    with pytest.raises(CommandError, match="not a month"):
        call_command("export_invoices", "October", "--out", str(tmp_path))
    with pytest.raises(CommandError, match="invalid choice"):
        call_command("export_invoices", "2026-10", "--format", "xlsx", "--out", str(tmp_path))
    with pytest.raises(CommandError, match="No issued invoice for 2026-09"):
        call_command("export_invoices", "2026-09", "--out", str(tmp_path))
    assert Invoice.objects.count() == 2


def test_export_invoices_into_a_file_or_below_one_is_a_clear_error(issued, tmp_path):
    existing = tmp_path / "README.md"
    existing.write_text("keep me")
    with pytest.raises(CommandError, match=r"^--out .*README\.md is a file, not a directory\.$"):
        call_command("export_invoices", "2026-10", "--out", str(existing))
    with pytest.raises(CommandError, match=r"^Cannot create the directory .*: Not a directory\.$"):
        call_command("export_invoices", "2026-10", "--out", str(existing / "invoices"))
    (tmp_path / "out" / "invoices-2026-10-csv.zip").mkdir(parents=True)
    with pytest.raises(CommandError, match=r"^Cannot write .*\.zip: Is a directory\.$"):
        call_command("export_invoices", "2026-10", "--out", str(tmp_path / "out"))
    assert existing.read_text() == "keep me"
    with pytest.raises(CommandError, match=r"^--out needs a directory"):
        call_command("export_invoices", "2026-10", "--out", " ")


def test_export_invoices_for_an_unknown_tenant_says_so_like_close_month(issued, tmp_path):
    for command, *options in (("export_invoices", "--out", str(tmp_path)), ("close_month",)):
        with pytest.raises(CommandError, match=r"^No tenant with slug 'nosuch'\.$"):
            call_command(command, "2026-10", "--tenant", "nosuch", *options)


def test_tenant_prices_are_labelled_without_a_sign_a_spreadsheet_would_run(shop):
    tenant, (key, _), model = shop
    at = datetime(2026, 10, 1, tzinfo=UTC)
    for percent, day in ((Decimal("20"), 2), (Decimal("-10"), 3)):
        price = TenantPrice.objects.create(
            tenant=tenant, model=model, markup_percent=percent, effective_from=at
        )
        record(key, model, at.replace(day=day), tenant_price=price, output=1_000_000)
        TenantPrice.objects.filter(pk=price.pk).update(effective_to=at.replace(day=day + 1))
    # A reason typed when accepting unpriced usage, beginning as a formula would.
    model.prices.update(input_per_mtok=None)
    record(key, model, at.replace(day=5), input_uncached=10)
    invoice = invoice_finalize(
        invoice=invoice_build(tenant=tenant, month=OCT, now=AFTER_OCT),
        now=AFTER_OCT,
        accept_unpriced='=HYPERLINK("http://x.test","agreed")',
        accepted_by="root",
    )

    content = invoice_export(invoice, "csv").content.decode("utf-8-sig")
    rows = list(csv.DictReader(io.StringIO(content)))
    labels = {r["price"] for r in rows}
    assert "20% markup of 2026-10-01 on the list price of 2026-01-01" in labels
    assert "10% discount of 2026-10-01 on the list price of 2026-01-01" in labels
    for row in rows:
        for cell in row.values():
            assert not cell.startswith(("=", "+", "-", "@")), row
    (unpriced,) = [r for r in rows if r["note"]]
    assert "accepted unbilled by root: =HYPERLINK(" in unpriced["note"]
    summary = zipfile.ZipFile(io.BytesIO(invoices_zip([invoice], "csv").content))
    (row,) = csv.DictReader(io.StringIO(summary.read("summary.csv").decode("utf-8-sig")))
    assert row["unpriced_note"].startswith("10 tokens (m) are not billed")
    assert "10% discount" in invoice_export(invoice, "html").content.decode()


def test_a_long_name_and_void_reason_wrap_inside_the_pdf_page(shop):
    from fpdf import FPDF

    tenant, (key, _), model = shop
    tenant.name = "Acme Holdings International Research and Development Division GmbH"
    tenant.contact_email = "accounts-payable@acme-holdings-international.example.com"
    tenant.save()
    record(key, model, datetime(2026, 10, 5, tzinfo=UTC), output=1_000_000)
    invoice = invoice_finalize(invoice=invoice_build(tenant=tenant, month=OCT), now=AFTER_OCT)
    invoice.status, invoice.void_reason = (
        Invoice.Status.VOID,
        (
            "Billed to the wrong legal entity; reissued to Acme Holdings International GmbH "
            "per ticket FIN-1234"
        ),
    )

    text = _pdf(invoice_document(invoice), compress=False).decode("latin-1")

    shown = re.findall(r"\((.*?)\) Tj", text)
    assert any("FIN-1234" in piece for piece in shown)
    assert any("example.com" in piece for piece in shown)
    measure = FPDF(format="A4")
    measure.add_page()
    measure.set_font("Helvetica", size=10)
    assert all(measure.get_string_width(piece) <= measure.epw for piece in shown), shown
