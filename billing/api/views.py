from __future__ import annotations

from datetime import UTC, datetime

from django.utils.dateparse import parse_datetime
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import mixins, status
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.response import Response

from tenants.api.scoping import SuperuserWritesMembersRead, TenantScopedViewSet

from ..exports import BULK_FORMATS, FORMATS, MEDIA_TYPES, invoice_export, invoices_zip
from ..invoicing import (
    InvoiceError,
    invoice_build,
    invoice_correct,
    invoice_finalize,
    invoice_mark_paid,
    invoice_void,
    month_parse,
)
from ..models import Invoice, UsageEvent
from .serializers import (
    InvoiceBuildSerializer,
    InvoiceDetailSerializer,
    InvoiceFinalizeSerializer,
    InvoicePaidSerializer,
    InvoiceSerializer,
    InvoiceVoidSerializer,
    UsageEventSerializer,
)

_FILTERS = [
    OpenApiParameter("tenant", str, description="Tenant slug, in any case."),
    OpenApiParameter(
        "request_id",
        str,
        description="A call's request id (its `x-request-id`): the call's rows, one per "
        "upstream attempt.",
    ),
    OpenApiParameter("model", str, description="Served model's public id."),
    OpenApiParameter("status", str, enum=[s for s, _ in UsageEvent.Status.choices]),
    OpenApiParameter("since", str, description="ISO 8601 instant, inclusive."),
    OpenApiParameter("until", str, description="ISO 8601 instant, exclusive."),
]


def _instant_param(name: str, value: str) -> datetime:
    """A query parameter's ISO 8601 instant in UTC, or a 400 naming the parameter: badly
    formed, a date or offset that does not exist (2026-13-45, +99:00), or outside the
    years 1 to 9999 once in UTC (0001-01-01T00:00:00+01:00)."""
    try:
        instant = parse_datetime(value)
    except ValueError:  # well formed, but no such date, time or offset
        instant = None
    if instant is None or instant.tzinfo is None:
        raise ValidationError({name: "An ISO 8601 instant with a UTC offset."})
    try:
        return instant.astimezone(UTC)
    except OverflowError:
        raise ValidationError({name: "An instant between the years 1 and 9999 in UTC."}) from None


@extend_schema_view(list=extend_schema(parameters=_FILTERS))
class UsageEventViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, TenantScopedViewSet):
    """The usage ledger of the tenants you manage, newest first. Read-only."""

    queryset = UsageEvent.objects.select_related(
        "tenant", "api_key", "served_model", "provider"
    ).order_by("-occurred_at", "-id")
    serializer_class = UsageEventSerializer

    def get_queryset(self):
        queryset = super().get_queryset()
        if self.action != "list":
            return queryset
        params = self.request.query_params
        queryset = self.tenant_filter(queryset)
        if params.get("request_id"):
            queryset = queryset.filter(request_id=params["request_id"])
        if params.get("model"):
            queryset = queryset.filter(served_model__public_id=params["model"])
        if params.get("status"):
            if params["status"] not in UsageEvent.Status.values:
                raise ValidationError({"status": f"One of {', '.join(UsageEvent.Status.values)}."})
            queryset = queryset.filter(status=params["status"])
        for name, lookup in (("since", "occurred_at__gte"), ("until", "occurred_at__lt")):
            if params.get(name):
                queryset = queryset.filter(**{lookup: _instant_param(name, params[name])})
        return queryset


def _conflict(exc: Exception) -> Response:
    return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)


_INVOICE_FILTERS = [
    OpenApiParameter("tenant", str, description="Tenant slug, in any case."),
    OpenApiParameter("month", str, description="YYYY-MM."),
    OpenApiParameter("status", str, enum=[s for s, _ in Invoice.Status.choices]),
]


@extend_schema_view(list=extend_schema(parameters=_INVOICE_FILTERS))
class InvoiceViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, TenantScopedViewSet):
    """Invoices of the tenants you manage, newest month first.

    Members read and download; superusers build drafts, finalize, void, correct and mark
    paid. Nothing edits an invoice: a draft is rebuilt from the ledger, a finalized one
    never changes (void it and correct it instead).
    """

    queryset = Invoice.objects.select_related("tenant", "corrects").order_by(
        "-month", "tenant__slug", "-id"
    )
    serializer_class = InvoiceSerializer
    permission_classes = [SuperuserWritesMembersRead]
    superuser_writes = "build, finalize, void, correct or mark paid invoices"

    def get_serializer_class(self):
        return InvoiceDetailSerializer if self.action == "retrieve" else InvoiceSerializer

    def get_queryset(self):
        queryset = super().get_queryset()
        if self.action != "list":
            return queryset
        params = self.request.query_params
        queryset = self.tenant_filter(queryset)
        if params.get("month"):
            try:
                queryset = queryset.filter(month=month_parse(params["month"]))
            except InvoiceError as exc:
                raise ValidationError({"month": str(exc)}) from None
        if params.get("status"):
            if params["status"] not in Invoice.Status.values:
                raise ValidationError({"status": f"One of {', '.join(Invoice.Status.values)}."})
            queryset = queryset.filter(status=params["status"])
        return queryset

    def _detail(self, invoice: Invoice, code: int = status.HTTP_200_OK) -> Response:
        invoice = self.get_queryset().get(pk=invoice.pk)
        context = self.get_serializer_context()
        return Response(InvoiceDetailSerializer(invoice, context=context).data, status=code)

    @extend_schema(request=InvoiceBuildSerializer, responses=InvoiceDetailSerializer)
    @action(detail=False, methods=["post"])
    def build(self, request):
        """Build or rebuild a tenant's draft for a month from the ledger (idempotent).
        Refused for a month that has not started yet in the tenant's time zone."""
        data = InvoiceBuildSerializer(data=request.data, context=self.get_serializer_context())
        data.is_valid(raise_exception=True)
        try:
            invoice = invoice_build(
                tenant=data.validated_data["tenant"], month=data.validated_data["month"]
            )
        except InvoiceError as exc:
            return _conflict(exc)
        return self._detail(invoice)

    @extend_schema(request=InvoiceFinalizeSerializer, responses=InvoiceDetailSerializer)
    @action(detail=True, methods=["post"])
    def finalize(self, request, pk=None):
        """Rebuild the draft one last time and number it. Refused before its month ends,
        while an earlier month is open, and while any of its usage has no price unless
        `accept_unpriced` says why those tokens are accepted unbilled."""
        invoice = self.get_object()
        data = InvoiceFinalizeSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            invoice = invoice_finalize(
                invoice=invoice,
                accept_unpriced=data.validated_data.get("accept_unpriced"),
                accepted_by=request.user.get_username(),
            )
        except InvoiceError as exc:
            return _conflict(exc)
        return self._detail(invoice)

    @extend_schema(request=InvoiceVoidSerializer, responses=InvoiceDetailSerializer)
    @action(detail=True, methods=["post"])
    def void(self, request, pk=None):
        """Void a finalized or paid invoice; it keeps its number."""
        data = InvoiceVoidSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            invoice = invoice_void(invoice=self.get_object(), reason=data.validated_data["reason"])
        except InvoiceError as exc:
            return _conflict(exc)
        return self._detail(invoice)

    @extend_schema(request=InvoicePaidSerializer, responses=InvoiceDetailSerializer)
    @action(detail=True, methods=["post"], url_path="mark-paid")
    def mark_paid(self, request, pk=None):
        data = InvoicePaidSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            invoice = invoice_mark_paid(
                invoice=self.get_object(), at=data.validated_data.get("paid_at")
            )
        except InvoiceError as exc:
            return _conflict(exc)
        return self._detail(invoice)

    @extend_schema(request=None, responses={201: InvoiceDetailSerializer})
    @action(detail=True, methods=["post"])
    def correct(self, request, pk=None):
        """A new draft replacing a void invoice, covering exactly what it covered."""
        try:
            invoice = invoice_correct(voided=self.get_object())
        except InvoiceError as exc:
            return _conflict(exc)
        return self._detail(invoice, status.HTTP_201_CREATED)

    @extend_schema(
        responses={(200, media): OpenApiTypes.BINARY for media in MEDIA_TYPES.values()},
        parameters=[OpenApiParameter("fmt", str, OpenApiParameter.PATH, enum=list(FORMATS))],
    )
    @action(detail=True, methods=["get"], url_path=r"download/(?P<fmt>[a-z]+)")
    def download(self, request, pk=None, fmt=None):
        """The invoice as a file: csv, json, html (printable) or pdf."""
        if fmt not in FORMATS:
            raise NotFound(f"No format {fmt!r}: one of {', '.join(FORMATS)}.")
        return invoice_export(self.get_object(), fmt).response()

    @extend_schema(
        responses={(200, "application/zip"): OpenApiTypes.BINARY},
        parameters=[
            OpenApiParameter("fmt", str, OpenApiParameter.PATH, enum=list(BULK_FORMATS)),
            OpenApiParameter("month", str, required=True, description="YYYY-MM."),
            OpenApiParameter("tenant", str, description="Tenant slug, in any case."),
        ],
    )
    @action(detail=False, methods=["get"], url_path=r"export/(?P<fmt>[a-z]+)")
    def export(self, request, fmt=None):
        """A month's issued invoices (finalized, paid, void) as one ZIP."""
        if fmt not in BULK_FORMATS:
            raise NotFound(f"No format {fmt!r}: one of {', '.join(BULK_FORMATS)}.")
        try:
            month = month_parse(request.query_params.get("month", ""))
        except InvoiceError as exc:
            raise ValidationError({"month": str(exc)}) from None
        invoices = self.tenant_filter(self.get_queryset())
        invoices = invoices.filter(month=month).exclude(status=Invoice.Status.DRAFT)
        name = f"invoices-{month:%Y-%m}"
        return invoices_zip(invoices.order_by("number"), fmt, name=name).response()
