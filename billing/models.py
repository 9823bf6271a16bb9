"""The usage ledger: one row per proxied call, facts first, money derived from them."""

from __future__ import annotations

from django.db import models, transaction
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
                violation_error_message="Set a markup or negotiated prices, not both.",
            ),
            models.CheckConstraint(
                condition=Q(markup_percent__isnull=False)
                | (Q(model__isnull=False) & Q(output_per_mtok__isnull=False)),
                name="tenant_price_negotiated_names_model_and_output",
                violation_error_message="A negotiated price names a model and sets its output "
                "price; a markup may cover every model.",
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
    """One upstream call, keyed by the gateway's request id and the attempt (unique per
    tenant, forever). A call to a route that falls back leaves one event per attempt that
    reached for an upstream: 1, 2, ...; a direct call has attempt 1 only.

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
    attempt = models.PositiveSmallIntegerField(
        default=1, help_text="1 for the first upstream attempt of the request, 2 for the next."
    )
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
                fields=["tenant", "request_id", "attempt"],
                name="usage_event_attempt_unique_per_tenant",
            ),
            models.CheckConstraint(condition=Q(cost__gte=0), name="usage_event_cost_not_negative"),
            models.CheckConstraint(condition=~Q(request_id=""), name="usage_event_request_id_set"),
        ]
        indexes = [
            models.Index(fields=["tenant", "occurred_at"], name="usage_tenant_time"),
            models.Index(fields=["served_model", "occurred_at"], name="usage_model_time"),
            # The health window (routing.health) reads recent events of every model.
            models.Index(fields=["occurred_at"], name="usage_time"),
        ]

    def __str__(self) -> str:
        return self.request_id

    @property
    def prompt_tokens(self) -> int:
        return self.input_uncached_tokens + self.input_cached_tokens

    @property
    def completion_tokens(self) -> int:
        return self.output_tokens + self.reasoning_tokens


class InvoiceImmutable(Exception):
    """A change to an invoice that is no longer a draft."""


class _DraftsOnlyQuerySet(models.QuerySet):
    """Bulk update() and delete() skip the models' save() and delete(), and with them
    their guards: these refuse, touching nothing, when any row they would touch belongs to
    an invoice that is no longer a draft. The invoices are locked first (on PostgreSQL),
    so none is finalized between the check and the change."""

    invoice_path = "pk"  # from a row to its invoice's id

    def update(self, **kwargs):
        with transaction.atomic(using=self.db):
            self._refuse_unless_drafts()
            return super().update(**kwargs)

    update.alters_data = True

    def delete(self):
        with transaction.atomic(using=self.db):
            self._refuse_unless_drafts()
            return super().delete()

    delete.alters_data = True

    def _refuse_unless_drafts(self) -> None:
        invoices = (
            Invoice._base_manager.using(self.db)
            .filter(pk__in=self.order_by().values(self.invoice_path))
            .select_for_update()
        )
        for status, number in invoices.values_list("status", "number"):
            if status != Invoice.Status.DRAFT:
                raise InvoiceImmutable(
                    f"Invoice {number} is {status}: neither it nor its lines change in bulk."
                )


class _InvoiceQuerySet(_DraftsOnlyQuerySet):
    invoice_path = "pk"


class _InvoiceLineQuerySet(_DraftsOnlyQuerySet):
    invoice_path = "invoice_id"


class _InvoiceKeyLineQuerySet(_DraftsOnlyQuerySet):
    invoice_path = "line__invoice_id"


class InvoiceNumber(models.Model):
    """The gap-free sequence of one year's invoice numbers: INV-<year>-<000042>. A number
    is taken in the transaction that finalizes its invoice, so a failure gives it back."""

    year = models.PositiveSmallIntegerField(primary_key=True)
    last = models.PositiveIntegerField(default=0)

    def __str__(self) -> str:
        return f"INV-{self.year}: {self.last}"


class Invoice(models.Model):
    """One tenant's invoice for one calendar month in its time zone.

    Draft: rebuilt from the ledger at will. Finalized: immutable, numbered. Then paid, or
    void (keeping its number; a correction is a new invoice pointing at it).

    Coverage: the month's usage recorded up to `cutoff`, plus usage of already invoiced
    months (before `previous_ends_at`) recorded after the previous invoice's cutoff
    (`previous_cutoff`), as adjustment lines.
    """

    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"
        FINALIZED = "finalized", "Finalized"
        PAID = "paid", "Paid"
        VOID = "void", "Void"

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="invoices")
    month = models.DateField(help_text="The first day of the month, in the tenant's calendar.")
    timezone = models.CharField(max_length=64)
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.DRAFT)
    number = models.CharField(max_length=32, unique=True, null=True, blank=True)
    currency = models.CharField(max_length=3, default="USD")
    total = models.DecimalField(max_digits=18, decimal_places=2, default=0)
    unpriced_tokens = models.PositiveBigIntegerField(default=0)
    cutoff = models.DateTimeField(help_text="Usage recorded up to this instant is included.")
    previous_cutoff = models.DateTimeField(
        null=True,
        blank=True,
        help_text="The previous invoice's cutoff: earlier months' usage recorded after it is "
        "adjusted here.",
    )
    previous_ends_at = models.DateTimeField(
        null=True, blank=True, help_text="The end of the previous invoice's month."
    )
    corrects = models.OneToOneField(
        "self",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="corrected_by",
        help_text="The void invoice this one replaces.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    finalized_at = models.DateTimeField(null=True, blank=True)
    paid_at = models.DateTimeField(null=True, blank=True)
    voided_at = models.DateTimeField(null=True, blank=True)
    void_reason = models.CharField(max_length=500, blank=True)
    unpriced_accepted = models.TextField(
        blank=True,
        help_text="Why its unpriced tokens were accepted unbilled at finalization, by a "
        "superuser; blank if it had none (an invoice with unpriced usage is otherwise refused).",
    )
    unpriced_accepted_by = models.CharField(
        max_length=150, blank=True, help_text="Who accepted them, where the path knew a user."
    )

    objects = _InvoiceQuerySet.as_manager()

    # What may still change once an invoice is finalized, by (stored, new) status: its
    # payment with the step to paid, its voiding with the step to void, nothing else.
    TRANSITIONS = {
        (Status.FINALIZED, Status.FINALIZED): frozenset({"updated_at"}),
        (Status.FINALIZED, Status.PAID): frozenset({"status", "paid_at", "updated_at"}),
        (Status.FINALIZED, Status.VOID): frozenset(
            {"status", "voided_at", "void_reason", "updated_at"}
        ),
        (Status.PAID, Status.PAID): frozenset({"updated_at"}),
        (Status.PAID, Status.VOID): frozenset({"status", "voided_at", "void_reason", "updated_at"}),
    }

    class Meta:
        ordering = ["-month", "tenant_id"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "month"],
                condition=~Q(status="void"),
                name="invoice_one_per_tenant_month",
            ),
            models.CheckConstraint(
                condition=Q(status="draft") | Q(number__isnull=False),
                name="invoice_numbered_unless_draft",
            ),
        ]

    def __str__(self) -> str:
        return self.number or f"draft {self.tenant} {self.month:%Y-%m}"

    def save(self, *args, **kwargs):
        if self.pk is not None:
            stored = Invoice.objects.filter(pk=self.pk).first()
            if stored is not None and stored.status != self.Status.DRAFT:
                changed = {
                    f.attname
                    for f in self._meta.concrete_fields
                    if getattr(stored, f.attname) != getattr(self, f.attname)
                }
                allowed = self.TRANSITIONS.get((stored.status, self.status))
                if allowed is None or changed - allowed:
                    raise InvoiceImmutable(
                        f"Invoice {stored.number} is {stored.status}: it cannot change "
                        f"({', '.join(sorted(changed)) or 'status'})."
                    )
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        # The stored status, not this object's: it may have been finalized since it was read.
        stored = Invoice.objects.filter(pk=self.pk).values_list("status", "number").first()
        if stored is not None and stored[0] != self.Status.DRAFT:
            raise InvoiceImmutable(f"Invoice {stored[1]} is {stored[0]}: it is never deleted.")
        return super().delete(*args, **kwargs)


class InvoiceLine(models.Model):
    """Tokens of one bucket, of one model at one price version, in one usage month."""

    class Bucket(models.TextChoices):
        INPUT = "input", "Input tokens"
        CACHED_INPUT = "cached_input", "Cached input tokens"
        OUTPUT = "output", "Output tokens"

    invoice = models.ForeignKey(Invoice, on_delete=models.CASCADE, related_name="lines")
    usage_month = models.DateField(help_text="An earlier month: an adjustment for late usage.")
    model = models.ForeignKey("routing.CatalogModel", on_delete=models.PROTECT, related_name="+")
    model_name = models.CharField(max_length=200)
    price = models.ForeignKey("routing.ModelPrice", on_delete=models.PROTECT, related_name="+")
    tenant_price = models.ForeignKey(
        TenantPrice, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    bucket = models.CharField(max_length=16, choices=Bucket.choices)
    quantity = models.PositiveBigIntegerField(help_text="Tokens.")
    unit_price = models.DecimalField(
        "unit price (USD per 1M tokens)", max_digits=14, decimal_places=6, null=True, blank=True
    )
    amount_exact = models.DecimalField(max_digits=30, decimal_places=12)
    amount = models.DecimalField(max_digits=18, decimal_places=2)

    objects = _InvoiceLineQuerySet.as_manager()

    class Meta:
        ordering = ["invoice", "usage_month", "model_name", "price_id", "tenant_price_id", "id"]

    def __str__(self) -> str:
        return f"{self.model_name} {self.bucket} x {self.quantity}"

    def save(self, *args, **kwargs):
        _refuse_unless_draft(self.invoice_id)
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        _refuse_unless_draft(self.invoice_id)
        return super().delete(*args, **kwargs)

    @property
    def is_adjustment(self) -> bool:
        return self.usage_month != self.invoice.month


class InvoiceKeyLine(models.Model):
    """One key's share of an invoice line. The cents of each line are allocated to its
    keys (largest remainders), so key subtotals add up to the invoice total exactly."""

    line = models.ForeignKey(InvoiceLine, on_delete=models.CASCADE, related_name="key_lines")
    api_key = models.ForeignKey("tenants.ApiKey", on_delete=models.PROTECT, related_name="+")
    quantity = models.PositiveBigIntegerField()
    amount_exact = models.DecimalField(max_digits=30, decimal_places=12)
    amount = models.DecimalField(max_digits=18, decimal_places=2)

    objects = _InvoiceKeyLineQuerySet.as_manager()

    class Meta:
        ordering = ["line", "api_key_id"]

    def __str__(self) -> str:
        return f"key {self.api_key_id}: {self.quantity}"

    def save(self, *args, **kwargs):
        _refuse_unless_draft(self._invoice_id())
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        _refuse_unless_draft(self._invoice_id())
        return super().delete(*args, **kwargs)

    def _invoice_id(self) -> int:
        return InvoiceLine.objects.values_list("invoice_id", flat=True).get(pk=self.line_id)


def _refuse_unless_draft(invoice_id: int) -> None:
    status = Invoice.objects.values_list("status", flat=True).get(pk=invoice_id)
    if status != Invoice.Status.DRAFT:
        raise InvoiceImmutable(f"Invoice {invoice_id} is {status}: its lines cannot change.")
