"""Reads of the catalog and its prices.

The request path reads the catalog from a per-process snapshot (`catalog_entry`), not
from the database: models, providers and price versions change rarely, and three ORM
queries per call cost more CPU than the rest of the gateway. Staleness is bounded and
never mis-prices anything:

- saving a model, price or provider clears the snapshot in the process that saved it;
- every other process reloads it at most TOLLGATE_CONFIG_CACHE_SECONDS later;
- a new price version must start at least that long after it is created
  (`routing.services.model_price_set`), so by the time it is in force every process
  already holds it, and each call is priced with the version in force when it arrived.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from datetime import datetime

from django.db.models import Q

from .config_cache import ConfigCache
from .models import CatalogModel, ModelPrice


def model_price_in_force(*, model_id: int, at: datetime) -> ModelPrice | None:
    """The list price version of a model in force at an instant, if any (from the database)."""
    return (
        ModelPrice.objects.filter(model_id=model_id, effective_from__lte=at)
        .filter(Q(effective_to__isnull=True) | Q(effective_to__gt=at))
        .first()
    )


@dataclass(frozen=True)
class CatalogEntry:
    """An enabled catalog model, its provider loaded, with all its price versions."""

    model: CatalogModel
    prices: tuple[ModelPrice, ...]  # ordered by effective_from
    _starts: tuple[datetime, ...] = field(repr=False, default=())

    def price_at(self, at: datetime) -> ModelPrice | None:
        index = bisect_right(self._starts, at) - 1
        if index < 0:
            return None
        price = self.prices[index]
        if price.effective_to is not None and price.effective_to <= at:
            return None
        return price


_catalog = ConfigCache(maxsize=1)


def _catalog_load() -> dict[str, CatalogEntry]:
    prices: dict[int, list[ModelPrice]] = {}
    for price in ModelPrice.objects.order_by("model_id", "effective_from"):
        prices.setdefault(price.model_id, []).append(price)
    entries = {}
    for model in CatalogModel.objects.filter(enabled=True).select_related("provider"):
        versions = tuple(prices.get(model.pk, ()))
        entries[model.public_id] = CatalogEntry(
            model=model, prices=versions, _starts=tuple(p.effective_from for p in versions)
        )
    return entries


def catalog_entry(public_id: str) -> CatalogEntry | None:
    """The enabled catalog model with this public id, from the process snapshot."""
    return _catalog.get_or_load("catalog", _catalog_load).get(public_id)


def catalog_cache_clear(**kwargs) -> None:
    """Drop this process's catalog snapshot (connected to the catalog models' signals)."""
    _catalog.clear()


@dataclass
class CatalogPriceGaps:
    unset_input: list[str] = field(default_factory=list)
    no_output: list[str] = field(default_factory=list)


def catalog_price_gaps() -> CatalogPriceGaps:
    """Enabled models whose current price lacks an input price, or has no output price."""
    gaps = CatalogPriceGaps()
    open_prices = {
        price.model_id: price for price in ModelPrice.objects.filter(effective_to__isnull=True)
    }
    for model in CatalogModel.objects.filter(enabled=True).order_by("public_id"):
        price = open_prices.get(model.pk)
        if price is None or price.output_per_mtok is None:
            gaps.no_output.append(model.public_id)
        elif price.input_per_mtok is None:
            gaps.unset_input.append(model.public_id)
    return gaps
