"""System checks that make an unpriced model loud instead of silently free."""

from django.core.checks import Warning as CheckWarning
from django.core.checks import register
from django.db import DatabaseError


@register("tollgate", deploy=False)
def catalog_prices_check(app_configs=None, **kwargs) -> list[CheckWarning]:
    from .selectors import catalog_price_gaps

    try:
        gaps = catalog_price_gaps()
    except DatabaseError:
        # Before the first migrate there is no catalog to check.
        return []
    warnings = []
    if gaps.unset_input:
        warnings.append(
            CheckWarning(
                f"{len(gaps.unset_input)} model(s) have no input price, so their input tokens "
                f"are metered but not charged: {', '.join(gaps.unset_input)}.",
                hint="Set input prices in the admin (Routing > Catalog models > prices).",
                id="routing.W001",
            )
        )
    if gaps.no_output:
        warnings.append(
            CheckWarning(
                f"{len(gaps.no_output)} model(s) have no output price, so they are listed but "
                f"refuse calls: {', '.join(gaps.no_output)}.",
                hint="Price them in the admin before tenants call them.",
                id="routing.W002",
            )
        )
    return warnings
