from __future__ import annotations

from datetime import date

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.reverse import reverse

from tenants.api.scoping import VisibleTenantField

from ..exports import FORMATS, invoice_key_totals
from ..invoicing import InvoiceError, month_parse, month_started_check
from ..models import Invoice, InvoiceLine, UsageEvent


class UsageEventSerializer(serializers.ModelSerializer):
    tenant = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    api_key = serializers.SlugRelatedField(slug_field="prefix", read_only=True)
    served_model = serializers.SlugRelatedField(slug_field="public_id", read_only=True)
    provider = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta:
        model = UsageEvent
        fields = (
            "id",
            "request_id",
            "attempt",
            "occurred_at",
            "tenant",
            "api_key",
            "requested_model",
            "served_model",
            "provider",
            "price",
            "status",
            "usage_source",
            "streamed",
            "input_uncached_tokens",
            "input_cached_tokens",
            "output_tokens",
            "reasoning_tokens",
            "unpriced_tokens",
            "cost",
            "latency_ms",
            "ttft_ms",
            "upstream_status",
            "error_code",
            "raw_usage",
        )
        read_only_fields = fields


@extend_schema_field({"type": "string", "pattern": r"^\d{4}-\d{2}$", "example": "2026-10"})
class MonthField(serializers.DateField):
    """A calendar month as YYYY-MM (stored as its first day)."""

    def __init__(self, **kwargs):
        super().__init__(format="%Y-%m", **kwargs)


class InvoiceLineSerializer(serializers.ModelSerializer):
    usage_month = MonthField()
    adjustment = serializers.BooleanField(source="is_adjustment")
    model = serializers.CharField(source="model_name")

    class Meta:
        model = InvoiceLine
        fields = (
            "usage_month",
            "adjustment",
            "model",
            "price",
            "tenant_price",
            "bucket",
            "quantity",
            "unit_price",
            "amount_exact",
            "amount",
        )
        read_only_fields = fields


class InvoiceSerializer(serializers.ModelSerializer):
    tenant = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    month = MonthField()
    corrects = serializers.SlugRelatedField(slug_field="number", read_only=True)
    downloads = serializers.SerializerMethodField()

    class Meta:
        model = Invoice
        fields = (
            "id",
            "number",
            "tenant",
            "month",
            "status",
            "currency",
            "total",
            "unpriced_tokens",
            "unpriced_accepted",
            "unpriced_accepted_by",
            "timezone",
            "starts_at",
            "ends_at",
            "cutoff",
            "finalized_at",
            "paid_at",
            "voided_at",
            "void_reason",
            "corrects",
            "downloads",
        )
        read_only_fields = fields

    def get_downloads(self, invoice) -> dict[str, str]:
        request = self.context.get("request")
        urls = {}
        for fmt in FORMATS:
            path = reverse("invoice-download", kwargs={"pk": invoice.pk, "fmt": fmt})
            urls[fmt] = request.build_absolute_uri(path) if request else path
        return urls


class InvoiceDetailSerializer(InvoiceSerializer):
    lines = InvoiceLineSerializer(many=True, read_only=True)
    keys = serializers.SerializerMethodField(
        help_text="Per API key: tokens by bucket and the amount, adding up to the total."
    )

    class Meta(InvoiceSerializer.Meta):
        fields = (*InvoiceSerializer.Meta.fields, "lines", "keys")
        read_only_fields = fields

    def get_keys(self, invoice) -> list[dict]:
        return invoice_key_totals(invoice)


class InvoiceBuildSerializer(serializers.Serializer):
    tenant = VisibleTenantField()
    month = serializers.RegexField(
        r"^\d{4}-\d{2}$",
        help_text="YYYY-MM: a month that has started in the tenant's time zone (the current "
        "month's draft is a preview).",
    )

    def validate_month(self, value: str) -> date:
        try:
            return month_parse(value)
        except InvoiceError as exc:
            raise serializers.ValidationError(str(exc)) from None

    def validate(self, data):
        try:
            month_started_check(data["tenant"], data["month"])
        except InvoiceError as exc:
            raise serializers.ValidationError({"month": str(exc)}) from None
        return data


class InvoiceVoidSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=500)


class InvoiceFinalizeSerializer(serializers.Serializer):
    accept_unpriced = serializers.CharField(
        required=False,
        help_text="Finalize although some usage has no price, saying why: those tokens stay "
        "on the invoice unbilled and the reason is stored on it. Ignored by an invoice "
        "without unpriced usage.",
    )


class InvoicePaidSerializer(serializers.Serializer):
    paid_at = serializers.DateTimeField(required=False, help_text="Default: now.")
