"""Tenants, their API keys, their model allowlists, and staff tokens for the management API."""

from __future__ import annotations

import zoneinfo

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.utils import timezone


def validate_timezone(value: str) -> None:
    if value not in zoneinfo.available_timezones():
        raise ValidationError(f"{value!r} is not an IANA time zone name (e.g. America/New_York).")


class Tenant(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        SUSPENDED = "suspended", "Suspended"

    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=64, unique=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    contact_email = models.EmailField(blank=True)
    timezone = models.CharField(max_length=64, default="UTC", validators=[validate_timezone])
    # Explicit: a tenant with an empty allowlist can call nothing.
    allowed_models = models.ManyToManyField(
        "routing.CatalogModel", blank=True, related_name="tenants"
    )
    # Users who may manage this tenant through /api/ without being superusers.
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="tenants")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug

    @property
    def is_active(self) -> bool:
        return self.status == self.Status.ACTIVE


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

    def is_usable(self, at=None) -> bool:
        at = at or timezone.now()
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or self.expires_at > at


class ApiKey(KeyBase):
    """A tenant's key for the OpenAI-compatible endpoints under /v1/."""

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="api_keys")
    # Empty: every model of the tenant's allowlist. Otherwise only these, within it.
    allowed_models = models.ManyToManyField(
        "routing.CatalogModel",
        blank=True,
        related_name="+",
        help_text="Narrows the tenant's allowlist for this key; empty means the whole list.",
    )

    class Meta:
        ordering = ["tenant", "-created_at"]
        verbose_name = "API key"


class StaffToken(KeyBase):
    """A bearer token for the management API under /api/, acting as one Django user."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="staff_tokens"
    )

    class Meta:
        ordering = ["user", "-created_at"]
