"""Invoice exports: CSV, JSON, printable HTML, PDF, and a month's invoices as one ZIP.

Every format is rendered from one document (`invoice_document`) read from the stored
invoice and its lines, never recomputed from the ledger, so each adds up to the stored
total exactly: the lines' rounded amounts sum to it, and so do the per-key subtotals.
Money is written as decimal strings (JSON included), never as floats.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from django.db.models import Sum
from django.http import HttpResponse
from django.template.loader import render_to_string
from fpdf import FPDF
from fpdf.enums import XPos, YPos

from tenants.budgets import places_at_least

from .invoicing import unpriced_note
from .models import Invoice, InvoiceKeyLine, InvoiceLine

FORMATS = ("csv", "json", "html", "pdf")
BULK_FORMATS = FORMATS


@dataclass(frozen=True)
class Export:
    filename: str
    content_type: str
    content: bytes

    def response(self) -> HttpResponse:
        """The export as a file download."""
        response = HttpResponse(self.content, content_type=self.content_type)
        response["Content-Disposition"] = f'attachment; filename="{self.filename}"'
        return response


def _text(value: Decimal | None, places: int = 2) -> str:
    """A decimal as plain text with at least `places` decimals and no exponent."""
    return "" if value is None else f"{places_at_least(value, places):f}"


def _stem(invoice: Invoice) -> str:
    return invoice.number or f"draft-{invoice.tenant.slug}-{invoice.month:%Y-%m}"


def _price_label(line: InvoiceLine) -> str:
    since = line.price.effective_from
    label = f"list price of {since:%Y-%m-%d}"
    if line.tenant_price_id is not None:
        tenant_price = line.tenant_price
        markup = tenant_price.markup_percent
        if markup is None:
            kind = "negotiated price"
        else:
            # "20% markup", "10% discount": no leading sign, which a spreadsheet would
            # read as the start of a formula.
            kind = f"{_text(abs(markup), 0)}% {'discount' if markup < 0 else 'markup'}"
        label = f"{kind} of {tenant_price.effective_from:%Y-%m-%d} on the {label}"
    return label


def invoice_key_totals(invoice: Invoice) -> list[dict]:
    """Per API key: tokens by bucket and the amount (its allocated cents), adding up to
    the invoice's total. One GROUP BY over the key lines."""
    per_key = (
        InvoiceKeyLine.objects.filter(line__invoice=invoice)
        .values("api_key_id", "api_key__prefix", "api_key__name", "line__bucket")
        .annotate(quantity=Sum("quantity"), amount=Sum("amount"))
        .order_by("api_key__prefix", "api_key_id")
    )
    keys: dict[int, dict] = {}
    for row in per_key:
        key = keys.setdefault(
            row["api_key_id"],
            {
                "key": row["api_key__prefix"],
                "name": row["api_key__name"],
                "tokens": {bucket: 0 for bucket in InvoiceLine.Bucket.values},
                "amount": Decimal(0),
            },
        )
        key["tokens"][row["line__bucket"]] += row["quantity"]
        key["amount"] += row["amount"]
    for key in keys.values():
        key["amount"] = _text(key["amount"])
    return list(keys.values())


def invoice_document(invoice: Invoice) -> dict:
    """The invoice as plain data: what every export renders."""
    lines = list(
        invoice.lines.select_related("price", "tenant_price").order_by(
            "usage_month", "model_name", "price_id", "tenant_price_id", "bucket", "id"
        )
    )
    bucket_labels = dict(InvoiceLine.Bucket.choices)
    rows = [
        {
            "usage_month": f"{line.usage_month:%Y-%m}",
            "adjustment": line.usage_month != invoice.month,
            "model": line.model_name,
            "price_version": line.price_id,
            "tenant_price_version": line.tenant_price_id,
            "price": _price_label(line),
            "bucket": line.bucket,
            "bucket_label": bucket_labels[line.bucket],
            "quantity": line.quantity,
            "unit_price_per_1m": _text(line.unit_price),
            "amount_exact": _text(line.amount_exact),
            "amount": _text(line.amount),
            # A line without a price is on the invoice with its tokens, billed nothing.
            "note": "no price: not billed" if line.unit_price is None else "",
        }
        for line in lines
    ]
    tenant = invoice.tenant
    return {
        "object": "invoice",
        "number": invoice.number,
        "status": invoice.status,
        "tenant": {"slug": tenant.slug, "name": tenant.name, "email": tenant.contact_email},
        "month": f"{invoice.month:%Y-%m}",
        "timezone": invoice.timezone,
        "period_start": invoice.starts_at.isoformat(),
        "period_end": invoice.ends_at.isoformat(),
        "currency": invoice.currency,
        "finalized_at": invoice.finalized_at.isoformat() if invoice.finalized_at else None,
        "paid_at": invoice.paid_at.isoformat() if invoice.paid_at else None,
        "voided_at": invoice.voided_at.isoformat() if invoice.voided_at else None,
        "void_reason": invoice.void_reason or None,
        "corrects": invoice.corrects.number if invoice.corrects_id else None,
        # Tokens metered without a price: on their lines at $0.00, never billed. A
        # finalized invoice has them only if a superuser accepted them, saying why.
        "unpriced_tokens": invoice.unpriced_tokens,
        "unpriced_accepted": invoice.unpriced_accepted or None,
        "unpriced_accepted_by": invoice.unpriced_accepted_by or None,
        "unpriced_note": unpriced_note(invoice) or None,
        "lines": rows,
        "keys": invoice_key_totals(invoice),
        "total": _text(invoice.total),
    }


CSV_COLUMNS = (
    "invoice",
    "tenant",
    "month",
    "usage_month",
    "adjustment",
    "model",
    "price",
    "bucket",
    "quantity",
    "unit_price_per_1m",
    "amount_exact",
    "amount",
    "currency",
    "note",
)


# What a spreadsheet program reads as the start of a formula in a cell it opens.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class _SpreadsheetWriter:
    """csv.writer whose text cells cannot run as formulas in a spreadsheet: a cell that
    begins like one (a reason typed when accepting unpriced usage, a model's name) gets
    a leading apostrophe, which spreadsheet programs show as text (OWASP's advice for
    CSV injection). Numbers are written as they are."""

    def __init__(self, out: io.StringIO):
        self._writer = csv.writer(out, lineterminator="\r\n")

    def writerow(self, row) -> None:
        self._writer.writerow(
            "'" + cell if isinstance(cell, str) and cell.startswith(_FORMULA_STARTS) else cell
            for cell in row
        )


def _csv(document: dict) -> bytes:
    out = io.StringIO()
    writer = _SpreadsheetWriter(out)
    writer.writerow(CSV_COLUMNS)
    for row in document["lines"]:
        writer.writerow(
            (
                document["number"] or "draft",
                document["tenant"]["slug"],
                document["month"],
                row["usage_month"],
                "yes" if row["adjustment"] else "no",
                row["model"],
                row["price"],
                row["bucket"],
                row["quantity"],
                row["unit_price_per_1m"],
                row["amount_exact"],
                row["amount"],
                document["currency"],
                # An unpriced line says so, and what the invoice says of all of them.
                f"{row['note']}. {document['unpriced_note']}" if row["note"] else "",
            )
        )
    # A BOM so that spreadsheet programs read the file as UTF-8.
    return ("\ufeff" + out.getvalue()).encode()


def _json(document: dict) -> bytes:
    return json.dumps(document, indent=2, ensure_ascii=False).encode()


def _html(document: dict) -> bytes:
    # Token counts with thousands separators, as finance reads them.
    lines = [{**line, "quantity": f"{line['quantity']:,}"} for line in document["lines"]]
    keys = [
        {**key, "tokens": {bucket: f"{n:,}" for bucket, n in key["tokens"].items()}}
        for key in document["keys"]
    ]
    shown = {**document, "lines": lines, "keys": keys}
    return render_to_string("billing/invoice.html", {"invoice": shown}).encode()


def _latin1(text: str) -> str:
    # The PDF uses the core Helvetica font (nothing to install or embed): characters
    # outside Latin-1 become "?". The HTML invoice shows any script.
    return text.encode("latin-1", "replace").decode("latin-1")


def _pdf(document: dict, *, compress: bool = True) -> bytes:
    pdf = FPDF(format="A4")
    pdf.set_compression(compress)
    pdf.set_title(_latin1(f"Invoice {document['number'] or 'draft'}"))
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 16)
    title = f"Invoice {document['number']}" if document["number"] else "Draft invoice"
    pdf.cell(0, 10, _latin1(title), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font("Helvetica", size=10)
    tenant = document["tenant"]
    for text in (
        f"Billed to: {tenant['name']} ({tenant['slug']}) {tenant['email']}".rstrip(),
        f"Period: {document['month']} ({document['timezone']}), "
        f"{document['period_start']} to {document['period_end']}",
        (f"Issued: {document['finalized_at']}, " if document["finalized_at"] else "")
        + f"Status: {document['status']}"
        + (f", corrects {document['corrects']}" if document["corrects"] else "")
        + (f", void: {document['void_reason']}" if document["void_reason"] else ""),
    ):
        # Wrapped at the margin: a long name or void reason is not cut at the page edge.
        pdf.multi_cell(0, 6, _latin1(text), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    if document["unpriced_note"]:
        pdf.ln(2)
        pdf.set_font("Helvetica", "B", 10)
        pdf.set_text_color(170, 0, 0)
        pdf.multi_cell(0, 5, _latin1(f"Unpriced usage: {document['unpriced_note']}."))
        pdf.set_text_color(0, 0, 0)
        pdf.set_font("Helvetica", size=10)
    pdf.ln(4)
    pdf.set_font("Helvetica", size=8)
    widths = (16, 30, 52, 24, 22, 16, 20)
    with pdf.table(col_widths=widths, text_align=("LEFT",) * 4 + ("RIGHT",) * 3) as table:
        table.row(("Month", "Model", "Price", "Tokens", "Quantity", "Per 1M", "Amount"))
        for row in document["lines"]:
            month = row["usage_month"] + (" adj." if row["adjustment"] else "")
            table.row(
                tuple(
                    _latin1(str(v))
                    for v in (
                        month,
                        row["model"],
                        row["price"],
                        row["bucket_label"],
                        f"{row['quantity']:,}",
                        row["unit_price_per_1m"],
                        row["amount"],
                    )
                )
            )
    pdf.ln(2)
    pdf.set_font("Helvetica", "B", 11)
    pdf.cell(
        0,
        8,
        f"Total {document['total']} {document['currency']}",
        align="R",
        new_x=XPos.LMARGIN,
        new_y=YPos.NEXT,
    )
    if document["keys"]:
        pdf.ln(4)
        pdf.set_font("Helvetica", "B", 10)
        pdf.cell(0, 6, "By API key", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.set_font("Helvetica", size=8)
        align = ("LEFT", "LEFT", "RIGHT", "RIGHT", "RIGHT", "RIGHT")
        with pdf.table(col_widths=(34, 46, 28, 28, 28, 20), text_align=align) as table:
            table.row(("Key", "Name", "Input", "Cached input", "Output", "Amount"))
            for key in document["keys"]:
                tokens = key["tokens"]
                table.row(
                    (
                        _latin1(f"{key['key']}..."),
                        _latin1(key["name"] or ""),
                        f"{tokens['input']:,}",
                        f"{tokens['cached_input']:,}",
                        f"{tokens['output']:,}",
                        key["amount"],
                    )
                )
    return bytes(pdf.output())


_RENDERERS = {
    "csv": (_csv, "text/csv; charset=utf-8"),
    "json": (_json, "application/json"),
    "html": (_html, "text/html; charset=utf-8"),
    "pdf": (_pdf, "application/pdf"),
}


# Each format's media type, without parameters (the management API's schema lists them).
MEDIA_TYPES = {fmt: content_type.split(";")[0] for fmt, (_, content_type) in _RENDERERS.items()}


def invoice_export(invoice: Invoice, fmt: str) -> Export:
    """One invoice in one format."""
    if fmt not in _RENDERERS:
        raise ValueError(f"Unknown format {fmt!r}: one of {', '.join(FORMATS)}.")
    render, content_type = _RENDERERS[fmt]
    return Export(f"{_stem(invoice)}.{fmt}", content_type, render(invoice_document(invoice)))


def invoices_zip(invoices: Iterable[Invoice], fmt: str, *, name: str = "invoices") -> Export:
    """Invoices in one format, one file each, with a summary.csv of their totals."""
    buffer = io.BytesIO()
    summary = io.StringIO()
    writer = _SpreadsheetWriter(summary)
    # A void invoice and its correction both appear: `corrects` says which replaces which,
    # and `counts` which totals add up to what is owed.
    writer.writerow(
        (
            "invoice",
            "tenant",
            "month",
            "status",
            "total",
            "currency",
            "counts",
            "corrects",
            "file",
            "unpriced_tokens",
            "unpriced_note",
        )
    )
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for invoice in invoices:
            export = invoice_export(invoice, fmt)
            archive.writestr(export.filename, export.content)
            writer.writerow(
                (
                    invoice.number or "draft",
                    invoice.tenant.slug,
                    f"{invoice.month:%Y-%m}",
                    invoice.status,
                    _text(invoice.total),
                    invoice.currency,
                    "no" if invoice.status == Invoice.Status.VOID else "yes",
                    invoice.corrects.number if invoice.corrects_id else "",
                    export.filename,
                    invoice.unpriced_tokens,
                    unpriced_note(invoice),
                )
            )
        archive.writestr("summary.csv", "\ufeff" + summary.getvalue())
    return Export(f"{name}-{fmt}.zip", "application/zip", buffer.getvalue())
