"""The unit prices a call is billed at: the list price version in force, unless one of
the tenant's own prices in force wins over it.

- A negotiated price names a model and its prices; a field it leaves empty falls back to
  the list price of that field.
- A markup adds a percentage to each list price of one model, or of every model. The
  marked-up unit price is rounded half up to six decimal places (USD per 1M tokens), the
  precision of every price here, so that costs stay exact to twelve places.
- A model's own row wins over an every-model markup.

Like list prices, tenant prices are versioned, served from a per-process snapshot, and
start at the earliest `routing.services.price_change_earliest()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal

from django.db import transaction

from routing.config_cache import ConfigCache
from routing.models import CatalogModel, ModelPrice
from routing.services import (
    PriceChangeError,
    price_change_earliest,
    price_version_cancel,
    price_version_check,
)

from .models import TenantPrice

UNIT_PLACES = Decimal("0.000001")

_tenant_prices = ConfigCache(maxsize=100_000)


@dataclass(frozen=True)
class UnitPrices:
    """USD per 1M tokens for each bucket, and the versions they come from."""

    input: Decimal | None
    cached_input: Decimal | None  # None: billed at `input`
    output: Decimal | None
    price: ModelPrice
    tenant_price: TenantPrice | None = None

    @property
    def cached_input_effective(self) -> Decimal | None:
        return self.cached_input if self.cached_input is not None else self.input


def _marked_up(value: Decimal | None, percent: Decimal) -> Decimal | None:
    if value is None:
        return None
    return (value * (100 + percent) / 100).quantize(UNIT_PLACES, rounding=ROUND_HALF_UP)


def unit_prices(price: ModelPrice, tenant_price: TenantPrice | None = None) -> UnitPrices:
    """The unit prices of a list price version, with a tenant price applied."""
    if tenant_price is None:
        return UnitPrices(
            price.input_per_mtok, price.cached_input_per_mtok, price.output_per_mtok, price
        )
    if tenant_price.markup_percent is not None:
        percent = tenant_price.markup_percent
        return UnitPrices(
            _marked_up(price.input_per_mtok, percent),
            _marked_up(price.cached_input_per_mtok, percent),
            _marked_up(price.output_per_mtok, percent),
            price,
            tenant_price,
        )

    def own(mine: Decimal | None, listed: Decimal | None) -> Decimal | None:
        return mine if mine is not None else listed

    return UnitPrices(
        own(tenant_price.input_per_mtok, price.input_per_mtok),
        own(tenant_price.cached_input_per_mtok, price.cached_input_per_mtok),
        own(tenant_price.output_per_mtok, price.output_per_mtok),
        price,
        tenant_price,
    )


def _versions(tenant_id: int) -> tuple[TenantPrice, ...]:
    return _tenant_prices.get_or_load(
        tenant_id,
        lambda: tuple(TenantPrice.objects.filter(tenant_id=tenant_id).order_by("effective_from")),
    )


def tenant_price_cache_clear(**kwargs) -> None:
    _tenant_prices.clear()


def tenant_price_in_force(*, tenant_id: int, model_id: int, at: datetime) -> TenantPrice | None:
    """The tenant's own price for a model at an instant (its model's row first)."""
    found: dict[bool, TenantPrice] = {}
    for version in _versions(tenant_id):
        if version.model_id not in (model_id, None):
            continue
        if version.effective_from <= at and (
            version.effective_to is None or version.effective_to > at
        ):
            found[version.model_id is not None] = version
    return found.get(True) or found.get(False)


def unit_prices_for_call(
    *, tenant_id: int, model_id: int, price: ModelPrice, at: datetime
) -> UnitPrices:
    return unit_prices(price, tenant_price_in_force(tenant_id=tenant_id, model_id=model_id, at=at))


def tenant_price_change_check(
    *,
    tenant,
    model: CatalogModel | None,
    effective_from: datetime,
    current: TenantPrice | None = None,
) -> None:
    """Raise PriceChangeError unless a new version of the tenant's price for a model (or,
    model None, for every model) may start then: not before `price_change_earliest()`,
    after the current version's start, and not where usage is already recorded with the
    current version."""
    if current is None:
        current = TenantPrice.objects.filter(
            tenant=tenant, model=model, effective_to__isnull=True
        ).first()
    price_version_check(effective_from=effective_from, current=current)


@transaction.atomic
def tenant_price_set(
    *,
    tenant,
    model: CatalogModel | None = None,
    markup_percent: Decimal | None = None,
    input_per_mtok: Decimal | None = None,
    cached_input_per_mtok: Decimal | None = None,
    output_per_mtok: Decimal | None = None,
    effective_from: datetime | None = None,
) -> TenantPrice:
    """Open a new version of the tenant's price for a model (or, for a markup, for every
    model), closing the current one. Starts at the earliest allowed by default."""
    effective_from = effective_from or price_change_earliest()
    negotiated = (input_per_mtok, cached_input_per_mtok, output_per_mtok)
    if markup_percent is not None and any(v is not None for v in negotiated):
        raise PriceChangeError("A tenant price is a markup or negotiated prices, not both.")
    if markup_percent is None and (model is None or output_per_mtok is None):
        raise PriceChangeError("A negotiated price names a model and sets its output price.")
    for value in (*negotiated, markup_percent):
        if value is not None and not isinstance(value, Decimal):
            raise PriceChangeError("Prices and markups are Decimals.")
    if any(v is not None and v < 0 for v in negotiated):
        raise PriceChangeError("Prices are not negative.")
    if markup_percent is not None and markup_percent <= -100:
        raise PriceChangeError("A markup is above -100 %.")
    current = (
        TenantPrice.objects.select_for_update()
        .filter(tenant=tenant, model=model, effective_to__isnull=True)
        .first()
    )
    tenant_price_change_check(
        tenant=tenant, model=model, effective_from=effective_from, current=current
    )
    if current is not None:
        current.effective_to = effective_from
        current.save(update_fields=["effective_to"])
    return TenantPrice.objects.create(
        tenant=tenant,
        model=model,
        markup_percent=markup_percent,
        input_per_mtok=input_per_mtok,
        cached_input_per_mtok=cached_input_per_mtok,
        output_per_mtok=output_per_mtok,
        effective_from=effective_from,
    )


def tenant_price_cancel(price: TenantPrice) -> TenantPrice | None:
    """Withdraw a scheduled tenant price version (`price_version_cancel`), reopening the
    tenant's version before it for the same model (or for every model)."""
    versions = TenantPrice.objects.filter(tenant_id=price.tenant_id, model_id=price.model_id)
    return price_version_cancel(price, versions)
