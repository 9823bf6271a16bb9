"""The usage ledger: one row per proxied call, facts first, money derived from them."""

from __future__ import annotations

from django.db import models
from django.db.models import Q


class TenantPrice(models.Model):
    """A tenant's own price, winning over the list price from its start: a negotiated
    price for one model, or a markup percentage on the list price of one model or of
    every model. Versioned like list prices; a model's own row wins over an all-models
    markup."""

    tenant = models.ForeignKey(
        "tenants.Tenant", on_delete=models.PROTECT, related_name="tenant_prices"
    )
    model = models.ForeignKey(
        "routing.CatalogModel",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="tenant_prices",
        help_text="Empty: every model (markups only).",
    )
    input_per_mtok = models.DecimalField(
        "input $/1M", max_digits=14, decimal_places=6, null=True, blank=True
    )
    cached_input_per_mtok = models.DecimalField(
        "cached input $/1M", max_digits=14, decimal_places=6, null=True, blank=True
    )
    output_per_mtok = models.DecimalField(
        "output $/1M", max_digits=14, decimal_places=6, null=True, blank=True
    )
    markup_percent = models.DecimalField(
        max_digits=7,
        decimal_places=3,
        null=True,
        blank=True,
        help_text="E.g. 20 bills the list price plus 20 %. Leave the prices empty.",
    )
    effective_from = models.DateTimeField()
    effective_to = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["tenant_id", "model_id", "-effective_from"]
        constraints = [
            models.CheckConstraint(
                condition=Q(markup_percent__isnull=True)
                | (
                    Q(input_per_mtok__isnull=True)
                    & Q(cached_input_per_mtok__isnull=True)
                    & Q(output_per_mtok__isnull=True)
                ),
                name="tenant_price_markup_or_prices",
            ),
            models.CheckConstraint(
                condition=Q(markup_percent__isnull=False)
                | (Q(model__isnull=False) & Q(output_per_mtok__isnull=False)),
                name="tenant_price_negotiated_names_model_and_output",
            ),
            models.CheckConstraint(
                condition=Q(markup_percent__isnull=True) | Q(markup_percent__gt=-100),
                name="tenant_price_markup_above_minus_100",
            ),
            models.CheckConstraint(
                condition=Q(effective_to__isnull=True)
                | Q(effective_to__gt=models.F("effective_from")),
                name="tenant_price_interval_forward",
            ),
            models.UniqueConstraint(
                fields=["tenant", "model"],
                condition=Q(effective_to__isnull=True, model__isnull=False),
                name="tenant_price_one_open_per_model",
            ),
            models.UniqueConstraint(
                fields=["tenant"],
                condition=Q(effective_to__isnull=True, model__isnull=True),
                name="tenant_price_one_open_for_all_models",
            ),
        ]

    def __str__(self) -> str:
        what = self.model.public_id if self.model_id else "every model"
        how = f"+{self.markup_percent}%" if self.markup_percent is not None else "negotiated"
        return f"{self.tenant} {what} {how} from {self.effective_from:%Y-%m-%d}"


class UsageEvent(models.Model):
    """One upstream call, keyed by the gateway's request id (unique per tenant, forever).

    Token buckets are disjoint: prompt = input_uncached + input_cached, and
    completion = output + reasoning. Reasoning is billed at the output price.
    """

    class Source(models.TextChoices):
        PROVIDER = "provider", "Reported by the provider"
        ESTIMATED = "estimated", "Estimated by the gateway"

    class Status(models.TextChoices):
        OK = "ok", "OK"
        UPSTREAM_ERROR = "upstream_error", "Upstream error"
        CLIENT_CANCELLED = "client_cancelled", "Client cancelled"

    request_id = models.CharField(max_length=64)
    tenant = models.ForeignKey(
        "tenants.Tenant", on_delete=models.PROTECT, related_name="usage_events"
    )
    api_key = models.ForeignKey(
        "tenants.ApiKey", on_delete=models.PROTECT, related_name="usage_events"
    )
    requested_model = models.CharField(max_length=200)
    served_model = models.ForeignKey(
        "routing.CatalogModel", on_delete=models.PROTECT, related_name="usage_events"
    )
    provider = models.ForeignKey(
        "routing.Provider", on_delete=models.PROTECT, related_name="usage_events"
    )
    price = models.ForeignKey(
        "routing.ModelPrice",
        on_delete=models.PROTECT,
        related_name="usage_events",
        help_text="The list price version in force when the call happened.",
    )
    tenant_price = models.ForeignKey(
        TenantPrice,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="usage_events",
        help_text="The tenant's own price version that won over the list price, if any.",
    )
    input_uncached_tokens = models.PositiveBigIntegerField(default=0)
    input_cached_tokens = models.PositiveBigIntegerField(default=0)
    output_tokens = models.PositiveBigIntegerField(
        default=0, help_text="Completion tokens other than reasoning."
    )
    reasoning_tokens = models.PositiveBigIntegerField(default=0)
    unpriced_tokens = models.PositiveBigIntegerField(
        default=0,
        help_text="Tokens in buckets the price version leaves unset: metered, not charged.",
    )
    cost = models.DecimalField("cost (USD)", max_digits=24, decimal_places=12)
    usage_source = models.CharField(max_length=16, choices=Source.choices)
    status = models.CharField(max_length=24, choices=Status.choices)
    upstream_status = models.PositiveSmallIntegerField(null=True, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    streamed = models.BooleanField(default=False)
    latency_ms = models.PositiveIntegerField()
    ttft_ms = models.PositiveIntegerField("time to first token (ms)", null=True, blank=True)
    raw_usage = models.JSONField(null=True, blank=True)
    occurred_at = models.DateTimeField(help_text="When the gateway received the request (UTC).")
    recorded_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-occurred_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "request_id"], name="usage_event_request_unique_per_tenant"
            ),
            models.CheckConstraint(condition=Q(cost__gte=0), name="usage_event_cost_not_negative"),
            models.CheckConstraint(condition=~Q(request_id=""), name="usage_event_request_id_set"),
        ]
        indexes = [
            models.Index(fields=["tenant", "occurred_at"], name="usage_tenant_time"),
            models.Index(fields=["served_model", "occurred_at"], name="usage_model_time"),
        ]

    def __str__(self) -> str:
        return self.request_id

    @property
    def prompt_tokens(self) -> int:
        return self.input_uncached_tokens + self.input_cached_tokens

    @property
    def completion_tokens(self) -> int:
        return self.output_tokens + self.reasoning_tokens
