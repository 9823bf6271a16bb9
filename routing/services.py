"""Writes to providers and prices."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from .models import CatalogModel, ModelPrice, Provider


class PriceChangeError(ValueError):
    """A price change that would rewrite history."""


def price_start_check(effective_from: datetime) -> None:
    """Refuse a price version (list or tenant) starting before `price_change_earliest()`."""
    earliest = price_change_earliest()
    if effective_from < earliest - timedelta(seconds=1):
        raise PriceChangeError(
            f"A new price must start at or after {earliest:%Y-%m-%d %H:%M:%S} UTC, so that "
            "every gateway process prices with it from its first second."
        )


def price_change_earliest() -> datetime:
    """The earliest start a new price version may have: now plus the configuration cache
    lifetime, rounded up to the next whole second."""
    lead = timedelta(seconds=settings.TOLLGATE_CONFIG_CACHE_SECONDS + 1)
    return (timezone.now() + lead).replace(microsecond=0)


def provider_set(
    *,
    name: str,
    base_url: str,
    api_key_env: str | None = None,
    timeout_seconds: float | None = None,
) -> tuple[Provider, bool]:
    """Create the provider or update it in place. Returns (provider, created).

    Raises ValidationError (and saves nothing) for a bad URL or timeout.
    """
    provider = Provider.objects.filter(name=name).first()
    created = provider is None
    if provider is None:
        provider = Provider(name=name)
    provider.base_url = base_url
    if api_key_env is not None:
        provider.api_key_env = api_key_env
    if timeout_seconds is not None:
        provider.timeout_seconds = timeout_seconds
    provider.full_clean(validate_unique=created)
    provider.save()
    return provider, created


@transaction.atomic
def model_price_set(
    *,
    model: CatalogModel,
    input_per_mtok: Decimal | None,
    output_per_mtok: Decimal | None,
    cached_input_per_mtok: Decimal | None = None,
    effective_from: datetime | None = None,
) -> ModelPrice:
    """Open a new price version from `effective_from`, closing the current one.

    The start defaults to the earliest allowed, `price_change_earliest()`: just past the
    gateways' configuration cache lifetime, so that every process knows the new version
    before it is in force. See `model_price_change_check` for what is refused.
    """
    effective_from = effective_from or price_change_earliest()
    for value in (input_per_mtok, output_per_mtok, cached_input_per_mtok):
        if value is not None and (not isinstance(value, Decimal) or value < 0):
            raise PriceChangeError("Prices are non-negative Decimals (USD per 1M tokens).")
    current = (
        ModelPrice.objects.select_for_update()
        .filter(model=model, effective_to__isnull=True)
        .first()
    )
    model_price_change_check(model=model, effective_from=effective_from, current=current)
    if current is not None:
        current.effective_to = effective_from
        current.save(update_fields=["effective_to"])
    return ModelPrice.objects.create(
        model=model,
        input_per_mtok=input_per_mtok,
        cached_input_per_mtok=cached_input_per_mtok,
        output_per_mtok=output_per_mtok,
        effective_from=effective_from,
    )


def price_version_cancellable(price) -> bool:
    """Whether a price version (list or tenant) may still be withdrawn: the latest of its
    sequence, and starting no earlier than a new version could (no gateway process prices
    with it yet, so no usage or invoice refers to it)."""
    return price.effective_to is None and price.effective_from >= price_change_earliest()


@transaction.atomic
def price_version_cancel(price, versions: QuerySet):
    """Withdraw a scheduled price version, reopening the one before it in `versions` (its
    own sequence: a model's list prices, or a tenant's prices for one model), which is
    returned (None when it was the only one). A version already in force, or followed by
    another, stays: it is history, or a later version starts from its end."""
    versions = list(versions.select_for_update().order_by("-effective_from"))
    price = next((v for v in versions if v.pk == price.pk), None)
    if price is None:
        raise PriceChangeError("This price version no longer exists.")
    if not price_version_cancellable(price):
        raise PriceChangeError(
            "Only the latest price version can be withdrawn, and only before "
            f"{price.effective_from:%Y-%m-%d %H:%M:%S} UTC comes within "
            f"{settings.TOLLGATE_CONFIG_CACHE_SECONDS} s (when gateway processes start "
            "pricing with it). Set a new version instead."
        )
    previous = next((v for v in versions if v.effective_to == price.effective_from), None)
    price.delete()
    if previous is not None:
        previous.effective_to = None
        previous.save(update_fields=["effective_to"])
    return previous


def model_price_cancel(price: ModelPrice) -> ModelPrice | None:
    """`price_version_cancel` for a model's list price."""
    return price_version_cancel(price, ModelPrice.objects.filter(model_id=price.model_id))


def model_price_change_check(
    *, model: CatalogModel, effective_from: datetime, current: ModelPrice | None = None
) -> None:
    """Raise PriceChangeError unless a new version of the model's price may start then:
    not before `price_change_earliest()`, after the current version's start, and not
    where usage is already recorded with the current version."""
    if current is None:
        current = ModelPrice.objects.filter(model=model, effective_to__isnull=True).first()
    price_version_check(effective_from=effective_from, current=current)


def price_version_check(*, effective_from: datetime, current) -> None:
    """Raise PriceChangeError unless a new version of a price (list or tenant) whose
    version in force is `current` (None: it has none) may start then: not before
    `price_change_earliest()`, after the current version's start, and not where usage is
    already recorded with the current version."""
    price_start_check(effective_from)
    if current is None:
        return
    if effective_from <= current.effective_from:
        raise PriceChangeError(
            f"The new price must start after the current one "
            f"({current.effective_from.isoformat()})."
        )
    if current.usage_events.filter(occurred_at__gte=effective_from).exists():
        raise PriceChangeError(
            "Usage after that instant is already priced with the current version; "
            "choose a later start."
        )
