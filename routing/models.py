"""The model catalog, its versioned prices, and the upstream providers that serve it."""

from __future__ import annotations

import os
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q


class Provider(models.Model):
    """An OpenAI-compatible upstream. Its secret lives in the environment, never here."""

    name = models.SlugField(max_length=64, unique=True)
    base_url = models.URLField(
        max_length=500, help_text="OpenAI-compatible base URL, ending in /v1."
    )
    api_key_env = models.CharField(
        "API key environment variable",
        max_length=100,
        blank=True,
        help_text="Name of the environment variable that holds this provider's API key. "
        "Leave empty for a provider that needs none (the mock upstream).",
    )
    timeout_seconds = models.FloatField(
        default=60.0,
        help_text="Connect and read timeout for one upstream call, in seconds.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(timeout_seconds__gt=0), name="provider_timeout_positive"
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def api_key(self) -> str | None:
        """The key read from the environment; None when the variable is named but unset."""
        if not self.api_key_env:
            return "not-needed"
        return os.environ.get(self.api_key_env) or None


MODALITIES = ("text", "image", "audio", "video")
CAPABILITIES = ("reasoning", "code", "vision")


def _validate_subset(allowed: tuple[str, ...]):
    def validate(value: object) -> None:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValidationError("Expected a list of names.")
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise ValidationError(f"Unknown: {', '.join(unknown)}. Allowed: {', '.join(allowed)}.")

    return validate


def validate_modalities(value: object) -> None:
    _validate_subset(MODALITIES)(value)


def validate_capabilities(value: object) -> None:
    _validate_subset(CAPABILITIES)(value)


def default_modalities() -> list[str]:
    return ["text"]


class CatalogModel(models.Model):
    """A model a tenant may be allowed to call, under its public id."""

    public_id = models.CharField(
        max_length=200, unique=True, help_text="The id clients send, e.g. deepseek-v4-flash."
    )
    display_name = models.CharField(max_length=200)
    family = models.CharField(max_length=64, help_text="DeepSeek, Qwen, Kimi, GLM, ...")
    developer = models.CharField(max_length=128)
    provider = models.ForeignKey(Provider, on_delete=models.PROTECT, related_name="models")
    upstream_model_id = models.CharField(
        max_length=200, help_text="The id the provider expects in the request body."
    )
    context_window = models.PositiveIntegerField(default=128_000)
    max_output_tokens = models.PositiveIntegerField(
        default=8192,
        help_text="Output cap of one call. Bounds a call's worst-case cost for budgets when the "
        "client sends no max_tokens (the gateway then sends this one).",
    )
    modalities = models.JSONField(default=default_modalities, validators=[validate_modalities])
    capabilities = models.JSONField(default=list, blank=True, validators=[validate_capabilities])
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["family", "public_id"]

    def __str__(self) -> str:
        return self.public_id


class ModelPrice(models.Model):
    """One version of a model's list price, USD per 1M tokens, in force over [from, to).

    A price change closes the current row and opens a new one (see
    `routing.services.model_price_set`); rows that usage events refer to are never edited.
    An unset input price is unset, not zero: the system check flags it.
    """

    model = models.ForeignKey(CatalogModel, on_delete=models.PROTECT, related_name="prices")
    input_per_mtok = models.DecimalField(
        "input $/1M", max_digits=14, decimal_places=6, null=True, blank=True
    )
    cached_input_per_mtok = models.DecimalField(
        "cached input $/1M",
        max_digits=14,
        decimal_places=6,
        null=True,
        blank=True,
        help_text="Unset: cached input tokens are billed at the input price.",
    )
    output_per_mtok = models.DecimalField(
        "output $/1M", max_digits=14, decimal_places=6, null=True, blank=True
    )
    effective_from = models.DateTimeField()
    effective_to = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["model_id", "-effective_from"]
        constraints = [
            models.UniqueConstraint(
                fields=["model"],
                condition=Q(effective_to__isnull=True),
                name="model_price_one_open_version",
            ),
            models.UniqueConstraint(
                fields=["model", "effective_from"], name="model_price_unique_start"
            ),
            models.CheckConstraint(
                condition=Q(effective_to__isnull=True)
                | Q(effective_to__gt=models.F("effective_from")),
                name="model_price_interval_forward",
            ),
            models.CheckConstraint(
                condition=(Q(input_per_mtok__isnull=True) | Q(input_per_mtok__gte=0))
                & (Q(cached_input_per_mtok__isnull=True) | Q(cached_input_per_mtok__gte=0))
                & (Q(output_per_mtok__isnull=True) | Q(output_per_mtok__gte=0)),
                name="model_price_not_negative",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model.public_id} from {self.effective_from:%Y-%m-%d %H:%M}"

    @property
    def cached_input_effective(self) -> Decimal | None:
        """The price cached input is billed at: its own, else the input price."""
        if self.cached_input_per_mtok is not None:
            return self.cached_input_per_mtok
        return self.input_per_mtok
