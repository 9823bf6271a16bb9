"""GET /v1/invoices: a tenant's own issued invoices, for its API keys.

Drafts are not shown (they change until finalized); void invoices are, marked void.
Another tenant's invoice is not found, whatever its number.
"""

from __future__ import annotations

import re

from django.urls import reverse
from rest_framework.response import Response

from routing.api.views import OpenAIView
from routing.errors import RouteNotFound

from ..exports import FORMATS, invoice_document, invoice_export
from ..models import Invoice

NUMBER = re.compile(r"INV-\d{4}-\d{6,}")


def _issued(key):
    return (
        Invoice.objects.filter(tenant_id=key.tenant_id)
        .exclude(status=Invoice.Status.DRAFT)
        .select_related("tenant", "corrects")
    )


def _get(key, number: str) -> Invoice:
    invoice = None
    if NUMBER.fullmatch(number):
        invoice = _issued(key).filter(number=number).first()
    if invoice is None:
        raise RouteNotFound(f"No invoice '{number[:40]}' for this key's tenant.")
    return invoice


def _summary(request, invoice: Invoice) -> dict:
    return {
        "id": invoice.number,
        "object": "invoice",
        "month": f"{invoice.month:%Y-%m}",
        "status": invoice.status,
        "currency": invoice.currency,
        "total": str(invoice.total),
        "finalized_at": int(invoice.finalized_at.timestamp()),
        "corrects": invoice.corrects.number if invoice.corrects_id else None,
        "downloads": {
            fmt: request.build_absolute_uri(
                reverse("v1-invoice-download", kwargs={"number": invoice.number, "fmt": fmt})
            )
            for fmt in FORMATS
        },
    }


class InvoiceListView(OpenAIView):
    def get(self, request):
        invoices = _issued(request.auth).order_by("-month", "-finalized_at")
        return Response({"object": "list", "data": [_summary(request, i) for i in invoices]})


class InvoiceDetailView(OpenAIView):
    def get(self, request, number: str):
        invoice = _get(request.auth, number)
        return Response({**invoice_document(invoice), **_summary(request, invoice)})


class InvoiceDownloadView(OpenAIView):
    def get(self, request, number: str, fmt: str):
        if fmt not in FORMATS:
            raise RouteNotFound(f"No format '{fmt}': one of {', '.join(FORMATS)}.")
        return invoice_export(_get(request.auth, number), fmt).response()
