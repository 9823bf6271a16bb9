"""Tenants, their API keys, their model allowlists, and staff tokens for the management API."""

from __future__ import annotations

import zoneinfo
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q
from django.db.models.functions import Lower
from django.utils import timezone

from routing.models import ServiceURLField, http_url_parts


def validate_timezone(value: str) -> None:
    if value not in zoneinfo.available_timezones():
        raise ValidationError(f"{value!r} is not an IANA time zone name (e.g. America/New_York).")


def validate_webhook_url(value: str) -> None:
    """http or https, and no user:password: the receiver checks the signature instead,
    and credentials here would be stored and shown in clear."""
    parts = http_url_parts(value, "A webhook URL")
    if parts is not None and (parts.username is not None or parts.password is not None):
        raise ValidationError(
            "Leave credentials out of the webhook URL: the receiver checks the "
            "Tollgate-Signature header instead."
        )


def tenant_slug_normalize(value: str) -> str:
    """A tenant slug as stored: lower case, so that a slug given in any case names its
    tenant ("ACME" names acme). The model's `clean` (the admin, the services) and the
    management API and the shell commands lower through here."""
    return value.lower()


class Tenant(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        SUSPENDED = "suspended", "Suspended"

    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=64, unique=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    contact_email = models.EmailField(blank=True, help_text="Budget alerts are emailed here.")
    alert_webhook_url = ServiceURLField(
        max_length=500,
        blank=True,
        validators=[validate_webhook_url],
        help_text="Budget alerts are POSTed here, signed.",
    )
    timezone = models.CharField(max_length=64, default="UTC", validators=[validate_timezone])
    # Explicit: a tenant with an empty allowlist can call nothing.
    allowed_models = models.ManyToManyField(
        "routing.CatalogModel", blank=True, related_name="tenants"
    )
    # Bumped whenever one of the tenant's budgets changes. The key lookup reads it with
    # the key, so every process knows of a new or changed budget from its next request.
    budget_version = models.PositiveIntegerField(default=0, editable=False)
    # Users who may manage this tenant through /api/ without being superusers.
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="tenants")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]
        constraints = [
            # With the unique slug: no two tenants whose slugs differ only in case.
            models.CheckConstraint(
                condition=Q(slug=Lower("slug")),
                name="tenant_slug_lower_case",
                violation_error_message="A tenant's slug is lower case.",
            ),
        ]

    def __str__(self) -> str:
        return self.slug

    def clean(self) -> None:
        # Slugs are lower case (admin, API and shell alike validate through here), so that
        # "ACME" is refused, or names the existing tenant, where "acme" exists.
        self.slug = tenant_slug_normalize(self.slug)
        self.name = self.name.strip()
        if not self.name:
            raise ValidationError({"name": "A tenant needs a name, not only spaces."})

    @property
    def is_active(self) -> bool:
        return self.status == self.Status.ACTIVE


def validate_future(value) -> None:
    """An expiry on issue: a key or token born expired would be refused on first use."""
    if value is not None and value <= timezone.now():
        raise ValidationError("Must be in the future.")


class KeyQuerySet(models.QuerySet):
    def usable(self, at=None):
        """Keys not revoked and not expired at `at` (default now)."""
        at = at or timezone.now()
        return self.filter(revoked_at__isnull=True).filter(
            Q(expires_at__isnull=True) | Q(expires_at__gt=at)
        )


class KeyBase(models.Model):
    """A bearer secret stored only as an HMAC-SHA256 digest and a display prefix."""

    name = models.CharField(max_length=200, blank=True)
    prefix = models.CharField(
        max_length=24, unique=True, editable=False, help_text="Shown to identify the key."
    )
    digest = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects = KeyQuerySet.as_manager()

    class Meta:
        abstract = True

    def __str__(self) -> str:
        return f"{self.prefix}…"

    def clean(self) -> None:
        # Only on issue: an expired key stays editable (its name, its limits).
        if self._state.adding:
            try:
                validate_future(self.expires_at)
            except ValidationError as exc:
                raise ValidationError({"expires_at": exc.messages}) from None

    def is_usable(self, at=None) -> bool:
        at = at or timezone.now()
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or self.expires_at > at


class ApiKey(KeyBase):
    """A tenant's key for the OpenAI-compatible endpoints under /v1/."""

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="api_keys")
    # At least 1: a limit of 0 read as "unlimited" for requests and tokens, and as "no
    # call at all" for concurrency. To stop a key, revoke it.
    rpm_limit = models.PositiveIntegerField(
        "requests per minute",
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="At least 1. Empty: unlimited.",
    )
    tpm_limit = models.PositiveIntegerField(
        "tokens per minute",
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="At least 1. Empty: unlimited.",
    )
    concurrency_limit = models.PositiveIntegerField(
        "concurrent requests",
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="At least 1. Empty: unlimited.",
    )
    replaced_by = models.ForeignKey(
        "self",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="replaces",
        editable=False,
        help_text="The key issued to rotate this one.",
    )
    # Empty: every model of the tenant's allowlist. Otherwise only these, within it.
    allowed_models = models.ManyToManyField(
        "routing.CatalogModel",
        blank=True,
        related_name="+",
        help_text="Narrows the tenant's allowlist for this key; empty means the whole list.",
    )

    class Meta:
        # Columns of this table only: ordering by "tenant" would join it into every query.
        ordering = ["tenant_id", "-created_at"]
        verbose_name = "API key"


class StaffToken(KeyBase):
    """A bearer token for the management API under /api/, acting as one Django user."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="staff_tokens"
    )

    class Meta:
        ordering = ["user_id", "-created_at"]

    def clean(self) -> None:
        super().clean()
        # On issue only: a user losing staff status later is the admin's to handle.
        if not self._state.adding or self.user_id is None:
            return
        name = self.user.get_username()
        if not self.user.is_active:
            raise ValidationError(
                {"user": f"{name} is inactive: staff tokens are for active users."}
            )
        if not self.user.is_staff:
            raise ValidationError(
                {
                    "user": f"{name} is not a staff user: staff tokens are for staff "
                    f"(give {name} staff status first)."
                }
            )


# --- budgets ---------------------------------------------------------------------------

# Budget counters count picodollars (1e-12 USD) in integers: the ledger's cost has twelve
# decimal places, and integer arithmetic is exact in SQL on PostgreSQL and SQLite alike
# (SQLite would add Decimal columns as floats).
PICO = 10**12

# The largest monthly limit: in picodollars it stays inside the 64-bit integers the
# counters are compared with (2^63 is about 9.2 million USD).
MAX_BUDGET_USD = Decimal("9000000")


def validate_budget_limit(value: Decimal) -> None:
    if not 0 < value <= MAX_BUDGET_USD:
        raise ValidationError("A monthly limit is more than 0 and at most 9,000,000 USD.")


def default_alert_thresholds() -> list[int]:
    return [50, 80, 100]


def validate_thresholds(value: object) -> None:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1000 for v in value
    ):
        raise ValidationError("Alert thresholds are whole percentages between 1 and 1000.")


class Budget(models.Model):
    """A monthly budget in USD for a tenant, or for one of its keys (both apply).

    The month is the calendar month in the tenant's time zone. A hard budget refuses
    calls that might not fit; a soft one only alerts.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="budgets")
    api_key = models.ForeignKey(
        ApiKey,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="budgets",
        help_text="Empty: the budget of the whole tenant.",
    )
    limit_usd = models.DecimalField(
        "monthly limit (USD)",
        max_digits=18,
        decimal_places=6,
        validators=[validate_budget_limit],
        help_text="More than 0, at most 9,000,000.",
    )
    hard = models.BooleanField(
        default=True, help_text="Hard budgets refuse calls that might not fit; soft ones alert."
    )
    alert_thresholds = models.JSONField(
        default=default_alert_thresholds,
        validators=[validate_thresholds],
        help_text="Percentages of the limit; each alerts once a month (email and webhook).",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["tenant_id", "api_key_id"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant"],
                condition=Q(api_key__isnull=True),
                name="budget_one_per_tenant",
                violation_error_message="This tenant already has a budget of the whole "
                "tenant: change that one.",
            ),
            models.UniqueConstraint(
                fields=["api_key"],
                condition=Q(api_key__isnull=False),
                name="budget_one_per_key",
                violation_error_message="This key already has a budget: change that one.",
            ),
            models.CheckConstraint(condition=Q(limit_usd__gt=0), name="budget_limit_positive"),
        ]

    def __str__(self) -> str:
        scope = f"key {self.api_key.prefix}" if self.api_key_id else "tenant"
        return f"{self.tenant.slug} {scope}: ${self.limit_usd}"

    @property
    def scope(self) -> str:
        return "key" if self.api_key_id else "tenant"

    @property
    def limit_pico(self) -> int:
        # Bounded as validated: a row written past the validation must not overflow SQL.
        return int(min(self.limit_usd, MAX_BUDGET_USD) * PICO)


class BudgetPeriod(models.Model):
    """A budget's counters for one month: spent (settled calls) and reserved (calls under
    way). A new month is a new row, so it starts from zero with no job having to run."""

    budget = models.ForeignKey(Budget, on_delete=models.CASCADE, related_name="periods")
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    spent_pico = models.BigIntegerField(default=0)
    reserved_pico = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["budget_id", "-starts_at"]
        constraints = [
            models.UniqueConstraint(fields=["budget", "starts_at"], name="budget_period_unique"),
            models.CheckConstraint(
                condition=Q(spent_pico__gte=0), name="budget_spent_not_negative"
            ),
            models.CheckConstraint(
                condition=Q(reserved_pico__gte=0), name="budget_reserved_not_negative"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.budget} from {self.starts_at:%Y-%m-%d}"


class BudgetReservation(models.Model):
    """The worst-case cost of one call under way, held against one budget period."""

    period = models.ForeignKey(BudgetPeriod, on_delete=models.CASCADE, related_name="reservations")
    request_id = models.CharField(max_length=64)
    amount_pico = models.BigIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["period", "request_id"], name="budget_reservation_unique"
            ),
        ]
        indexes = [models.Index(fields=["request_id"], name="budget_reservation_request")]

    def __str__(self) -> str:
        return f"{self.request_id} holds {self.amount_pico} p$"


class BudgetAlert(models.Model):
    """A threshold crossed in a period: one row, so each alert fires once."""

    period = models.ForeignKey(BudgetPeriod, on_delete=models.CASCADE, related_name="alerts")
    threshold = models.PositiveSmallIntegerField()
    spent_pico = models.BigIntegerField(help_text="Spent when the threshold was crossed.")
    created_at = models.DateTimeField(auto_now_add=True)
    emailed_at = models.DateTimeField(null=True, blank=True)
    # When its email and webhook tasks reached the broker; empty while the broker was
    # down, and queued again then (tenants.tasks.budget_alerts_queue_due_task).
    queued_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["period", "threshold"], name="budget_alert_once"),
        ]

    def __str__(self) -> str:
        return f"{self.threshold}% of {self.period}"


class WebhookDelivery(models.Model):
    """One attempt to deliver a webhook, with its result."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="webhook_deliveries")
    alert = models.ForeignKey(
        BudgetAlert, on_delete=models.CASCADE, null=True, related_name="deliveries"
    )
    url = models.URLField(max_length=500)
    event = models.CharField(max_length=64)
    payload = models.JSONField()
    attempt = models.PositiveSmallIntegerField()
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True)
    succeeded = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "webhook deliveries"

    def __str__(self) -> str:
        return f"{self.event} to {self.url} (attempt {self.attempt})"


# --- rate limits -------------------------------------------------------------------------


class RateWindow(models.Model):
    """Requests and tokens of one key in one minute, shared by every gateway process."""

    api_key = models.ForeignKey(ApiKey, on_delete=models.CASCADE, related_name="+")
    window_start = models.DateTimeField()
    requests = models.PositiveIntegerField(default=0)
    tokens = models.PositiveBigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["api_key", "window_start"], name="rate_window_unique"),
        ]

    def __str__(self) -> str:
        return f"key {self.api_key_id} at {self.window_start:%H:%M}"


class KeyLease(models.Model):
    """One call under way for a key with a concurrency limit. Leases of crashed processes
    expire on their own."""

    api_key = models.ForeignKey(ApiKey, on_delete=models.CASCADE, related_name="+")
    request_id = models.CharField(max_length=64, unique=True)
    expires_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["api_key", "expires_at"], name="key_lease_live")]

    def __str__(self) -> str:
        return self.request_id
