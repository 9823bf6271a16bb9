"""Reads of the catalog and its prices."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from django.db.models import Q

from .models import CatalogModel, ModelPrice


def model_price_in_force(*, model_id: int, at: datetime) -> ModelPrice | None:
    """The list price version of a model in force at an instant, if any."""
    return (
        ModelPrice.objects.filter(model_id=model_id, effective_from__lte=at)
        .filter(Q(effective_to__isnull=True) | Q(effective_to__gt=at))
        .first()
    )


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
