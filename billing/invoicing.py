"""Monthly invoices from the usage ledger.

An invoice covers one tenant's calendar month in its time zone, the half-open interval
[start, end). Its lines come from one GROUP BY over the ledger: per usage month, model,
list price version, tenant price version and key, the summed token buckets. Each line is
one bucket (uncached input, cached input, output with reasoning) of one model at one
price: integer tokens, the unit price copied, the exact amount, and that amount rounded
once to cents, half up. The total is the sum of the rounded lines. Each line's cents are
allocated to its keys by largest remainders, so the per-key subtotals add up to the
total exactly.

Coverage is set by the invoice's `cutoff` and its previous invoice. The month's usage
recorded up to `cutoff` is on the invoice: for a draft, the instant it was built; for a
finalized one, COMMIT_MARGIN before the finalizing instant.
Usage of the months the previous numbered invoice covered (before its end) recorded
after its cutoff arrived late: it goes on this invoice as adjustment lines naming their
month. Every event is thus on exactly one invoice, provided months close in order,
which finalization enforces (it refuses while an earlier month's usage is uninvoiced).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import transaction
from django.db.models import BooleanField, Case, F, Q, Sum, Value, When
from django.db.models.functions import TruncMonth
from django.utils import timezone

from routing.models import CatalogModel, ModelPrice
from tenants.budgets import budget_month
from tenants.models import Tenant

from .models import (
    Invoice,
    InvoiceKeyLine,
    InvoiceLine,
    InvoiceNumber,
    TenantPrice,
    UsageEvent,
)
from .pricing import unit_prices

CENT = Decimal("0.01")
# A usage event's `recorded_at` is taken just before its transaction commits. An invoice
# being finalized covers what was recorded up to this long before, so that every event it
# could cover is committed when it reads the ledger; later ones are adjustments on the
# next invoice. Never lost between the two. A draft is a preview, rebuilt when finalized:
# it covers everything recorded up to the moment it is built.
COMMIT_MARGIN = timedelta(minutes=5)


class InvoiceError(Exception):
    """An invoicing step that cannot be done; the message says why."""


def month_parse(value: str) -> date:
    """ "2026-10" -> date(2026, 10, 1)."""
    try:
        year, month = (int(part) for part in value.split("-"))
        if not 1970 <= year <= 9998:
            raise ValueError
        return date(year, month, 1)
    except ValueError:
        raise InvoiceError(f"{value!r} is not a month like 2026-10.") from None


def month_bounds(month: date, tz_name: str) -> tuple[datetime, datetime]:
    """[start, end) of a calendar month in a time zone, as UTC instants."""
    noon = datetime(month.year, month.month, 1, 12, tzinfo=ZoneInfo(tz_name))
    return budget_month(noon, tz_name)


def month_started_check(tenant: Tenant, month: date, now: datetime | None = None) -> None:
    """Refuse a month that has not started yet in the tenant's time zone: it has nothing
    to bill, and a draft of it would be empty. (The current month's draft is a preview.)"""
    if (now or timezone.now()) < month_bounds(month, tenant.timezone)[0]:
        raise InvoiceError(
            f"{month:%Y-%m} has not started yet in {tenant.slug}'s time zone ({tenant.timezone})."
        )


@dataclass
class _Line:
    usage_month: date
    model_id: int
    price_id: int
    tenant_price_id: int | None
    bucket: str
    unit: Decimal | None
    keys: dict[int, int]  # api key id -> tokens

    @property
    def quantity(self) -> int:
        return sum(self.keys.values())


def _exact(quantity: int, unit: Decimal | None) -> Decimal:
    return Decimal(0) if unit is None else (quantity * unit).scaleb(-6)


def _rounded(amount: Decimal) -> Decimal:
    return amount.quantize(CENT, rounding=ROUND_HALF_UP)


def _allocate(total: Decimal, shares: dict[int, Decimal]) -> dict[int, Decimal]:
    """Split a rounded amount into cents over exact shares: floor each share, then give
    the cents left to the largest remainders (ties: the lowest key id first)."""
    floors = {k: v.quantize(CENT, rounding=ROUND_DOWN) for k, v in shares.items()}
    left = int((total - sum(floors.values())) / CENT)
    order = sorted(shares, key=lambda k: (-(shares[k] - floors[k]), k))
    for k in order[: max(left, 0)]:
        floors[k] += CENT
    return floors


def _month_after(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def _month_before(month: date) -> date:
    return date(month.year - (month.month == 1), (month.month - 2) % 12 + 1, 1)


def _tenant_locked(pk: int) -> Tenant:
    """The tenant row locked for the caller's transaction: invoicing is serialized per
    tenant. FOR NO KEY UPDATE on PostgreSQL, so that the gateway's inserts referring to
    the tenant (usage events) do not wait for it."""
    return Tenant.objects.select_for_update(no_key=True).get(pk=pk)


# Events with tokens: what an invoice bills. Failed calls with no usage are in the
# ledger but on no invoice line, and hold no month open.
BILLABLE = (
    Q(input_uncached_tokens__gt=0)
    | Q(input_cached_tokens__gt=0)
    | Q(output_tokens__gt=0)
    | Q(reasoning_tokens__gt=0)
)


def _previous(tenant: Tenant, month: date) -> Invoice | None:
    """The tenant's latest numbered invoice of an earlier month (a void one included:
    its correction takes over exactly its coverage)."""
    return (
        Invoice.objects.filter(tenant=tenant, month__lt=month)
        .exclude(status=Invoice.Status.DRAFT)
        .order_by("-month", "-cutoff")
        .first()
    )


def _usage_lines(tenant: Tenant, invoice: Invoice, tz_name: str) -> tuple[list[_Line], int]:
    """The invoice's lines from one GROUP BY over its events, and their unpriced tokens."""
    in_month = Q(occurred_at__gte=invoice.starts_at, occurred_at__lt=invoice.ends_at)
    late = Q(pk__in=[])  # no previous invoice: nothing arrived late for it
    if invoice.previous_cutoff is not None:
        late = Q(occurred_at__lt=invoice.previous_ends_at, recorded_at__gt=invoice.previous_cutoff)
    groups = (
        UsageEvent.objects.filter(tenant=tenant, recorded_at__lte=invoice.cutoff)
        .filter(in_month | late)
        .annotate(
            usage_month=TruncMonth("occurred_at", tzinfo=ZoneInfo(tz_name)),
            # The invoice's own events belong to its month, whatever the calendar of the
            # time zone says (its start follows the previous invoice's end).
            earlier=Case(
                When(occurred_at__lt=invoice.starts_at, then=Value(True)),
                default=Value(False),
                output_field=BooleanField(),
            ),
        )
        .values(
            "usage_month",
            "earlier",
            "served_model_id",
            "price_id",
            "tenant_price_id",
            "api_key_id",
        )
        .annotate(
            uncached=Sum("input_uncached_tokens"),
            cached=Sum("input_cached_tokens"),
            output=Sum(F("output_tokens") + F("reasoning_tokens")),
            unpriced=Sum("unpriced_tokens"),
        )
        .order_by()
    )
    groups = list(groups)
    prices = ModelPrice.objects.in_bulk({g["price_id"] for g in groups})
    tenant_prices = TenantPrice.objects.in_bulk(
        {g["tenant_price_id"] for g in groups if g["tenant_price_id"]}
    )
    lines: dict[tuple, _Line] = {}
    unpriced = 0
    latest_invoiced = None  # the month of the invoice before this one, once needed
    for g in groups:
        units = unit_prices(prices[g["price_id"]], tenant_prices.get(g["tenant_price_id"]))
        usage_month = invoice.month
        if g["earlier"]:
            # Late usage of an invoiced month: an adjustment naming that month. The
            # tenant's time zone may have moved east since, and read it as this month.
            usage_month = g["usage_month"]
            usage_month = usage_month.date() if isinstance(usage_month, datetime) else usage_month
            if latest_invoiced is None:
                previous = _previous(tenant, invoice.month)
                latest_invoiced = previous.month if previous else _month_before(invoice.month)
            usage_month = min(usage_month, latest_invoiced)
        unpriced += g["unpriced"] or 0
        for bucket, unit, tokens in (
            (InvoiceLine.Bucket.INPUT, units.input, g["uncached"]),
            (InvoiceLine.Bucket.CACHED_INPUT, units.cached_input_effective, g["cached"]),
            (InvoiceLine.Bucket.OUTPUT, units.output, g["output"]),
        ):
            if not tokens:
                continue
            slot = (usage_month, g["served_model_id"], g["price_id"], g["tenant_price_id"], bucket)
            line = lines.get(slot)
            if line is None:
                line = lines[slot] = _Line(*slot, unit=unit, keys=defaultdict(int))
            line.keys[g["api_key_id"]] += tokens
    return list(lines.values()), unpriced


@transaction.atomic
def invoice_build(
    *, tenant: Tenant, month: date, now: datetime | None = None, finalizing: bool = False
) -> Invoice:
    """Build (or rebuild) the tenant's draft invoice for a month from the ledger.

    The draft covers the usage recorded up to `now`. `finalizing`: it is built to be
    finalized at `now` (or to show what finalizing would do, in a dry run), so it covers
    what was recorded up to COMMIT_MARGIN before. A correction covers what the invoice it
    replaces covered, either way.

    Idempotent; a numbered invoice is returned unchanged. Serialized per tenant.
    """
    now = now or timezone.now()
    tenant = _tenant_locked(tenant.pk)
    invoice = (
        Invoice.objects.filter(tenant=tenant, month=month)
        .exclude(status=Invoice.Status.VOID)
        .first()
    )
    if invoice is not None and invoice.status != Invoice.Status.DRAFT:
        return invoice
    if invoice is None:
        # A month whose invoice was voided is rebuilt as its correction.
        voided = (
            Invoice.objects.filter(tenant=tenant, month=month, status=Invoice.Status.VOID)
            .filter(corrected_by__isnull=True)
            .order_by("-voided_at")
            .first()
        )
        invoice = Invoice(tenant=tenant, month=month, corrects=voided)
    if invoice.corrects_id is not None:
        # A correction covers exactly what the invoice it replaces covered.
        replaced = invoice.corrects
        invoice.previous_cutoff = replaced.previous_cutoff
        invoice.previous_ends_at = replaced.previous_ends_at
        invoice.cutoff = replaced.cutoff
        invoice.timezone = replaced.timezone
        invoice.starts_at, invoice.ends_at = replaced.starts_at, replaced.ends_at
    else:
        # A void invoice counts: its coverage carries on through its correction, and
        # the invoices after it bill the usage it covered that arrived late.
        if (
            Invoice.objects.filter(tenant=tenant, month__gt=month)
            .exclude(status=Invoice.Status.DRAFT)
            .exists()
        ):
            raise InvoiceError(
                f"A later month of {tenant.slug} is already invoiced: months close in order."
            )
        previous = _previous(tenant, month)
        invoice.previous_cutoff = previous.cutoff if previous else None
        invoice.previous_ends_at = previous.ends_at if previous else None
        invoice.cutoff = now - COMMIT_MARGIN if finalizing else now
        invoice.timezone = tenant.timezone
        invoice.starts_at, invoice.ends_at = month_bounds(month, invoice.timezone)
        if previous is not None and _month_after(previous.month) == month:
            # Months follow each other without gap or overlap, also when the tenant's
            # time zone changed between them.
            invoice.starts_at = previous.ends_at
    invoice.save()

    invoice.lines.all().delete()
    drafts, unpriced = _usage_lines(tenant, invoice, invoice.timezone)
    models = CatalogModel.objects.in_bulk({d.model_id for d in drafts})
    lines, key_shares = [], []
    for draft in sorted(drafts, key=lambda d: (d.usage_month, models[d.model_id].public_id)):
        exact = _exact(draft.quantity, draft.unit)
        lines.append(
            InvoiceLine(
                invoice=invoice,
                usage_month=draft.usage_month,
                model_id=draft.model_id,
                model_name=models[draft.model_id].public_id,
                price_id=draft.price_id,
                tenant_price_id=draft.tenant_price_id,
                bucket=draft.bucket,
                quantity=draft.quantity,
                unit_price=draft.unit,
                amount_exact=exact,
                amount=_rounded(exact),
            )
        )
        key_shares.append(draft.keys)
    InvoiceLine.objects.bulk_create(lines)
    key_lines = []
    for line, keys in zip(lines, key_shares, strict=True):
        exact = {k: _exact(q, line.unit_price) for k, q in keys.items()}
        for key_id, amount in _allocate(line.amount, exact).items():
            key_lines.append(
                InvoiceKeyLine(
                    line=line,
                    api_key_id=key_id,
                    quantity=keys[key_id],
                    amount_exact=exact[key_id],
                    amount=amount,
                )
            )
    InvoiceKeyLine.objects.bulk_create(key_lines)
    invoice.total = sum((line.amount for line in lines), Decimal(0))
    invoice.unpriced_tokens = unpriced
    invoice.save(update_fields=["total", "unpriced_tokens", "updated_at"])
    return invoice


def _number_take(year: int) -> str:
    """The next number of the year's gap-free sequence, in the caller's transaction."""
    InvoiceNumber.objects.get_or_create(year=year)
    sequence = InvoiceNumber.objects.select_for_update().get(year=year)
    sequence.last += 1
    sequence.save(update_fields=["last"])
    return f"INV-{year}-{sequence.last:06d}"


def _acceptance(reason: str | None) -> str | None:
    """A reason to accept unpriced usage, stripped; None if none was given. A blank one
    is refused: accepting tokens unbilled is said in words."""
    if reason is None:
        return None
    if not reason.strip():
        raise InvoiceError("Say why the unpriced usage is accepted unbilled.")
    return reason.strip()


@transaction.atomic
def invoice_finalize(
    *,
    invoice: Invoice,
    now: datetime | None = None,
    built: bool = False,
    accept_unpriced: str | None = None,
    accepted_by: str = "",
) -> Invoice:
    """Rebuild a draft from the ledger one last time, refuse it if `_finalize_check` says
    so (its month not over, an earlier month open, usage with no price), and number it.
    Idempotent: a numbered invoice is returned unchanged.

    `accept_unpriced`: a superuser's reason to finalize it although some of its usage has
    no price. Those tokens stay on their lines unbilled ($0.00, no unit price) and the
    reason (and `accepted_by`, who gave it) is stored on the invoice, which every export
    shows. Blank is refused; an invoice with no unpriced usage ignores it. Never given by
    the scheduled task.

    `built`: the caller has just built the draft with the same `now` and `finalizing=True`
    in the enclosing transaction (holding the tenant's lock), so it is not rebuilt again."""
    now = now or timezone.now()
    accept_unpriced = _acceptance(accept_unpriced)
    tenant = _tenant_locked(invoice.tenant_id)
    invoice = Invoice.objects.get(pk=invoice.pk)
    if invoice.status != Invoice.Status.DRAFT:
        return invoice
    if not built:
        invoice = invoice_build(tenant=tenant, month=invoice.month, now=now, finalizing=True)
    _finalize_check(tenant, invoice, now, accept_unpriced=accept_unpriced)
    if invoice.unpriced_tokens:
        invoice.unpriced_accepted = accept_unpriced
        invoice.unpriced_accepted_by = accepted_by[:150]
    # Issued when it is numbered: a catch-up acting as of a past instant (its cutoff and
    # checks) dates the invoice now, so that numbers and issue dates run in one order.
    issued = max(now, timezone.now())
    invoice.number = _number_take(issued.year)
    invoice.status = Invoice.Status.FINALIZED
    invoice.finalized_at = issued
    invoice.save()
    return invoice


def unpriced_models(invoice: Invoice) -> list[str]:
    """The models of the invoice's lines without a unit price, each once (late usage of
    earlier months included)."""
    return sorted(
        set(invoice.lines.filter(unit_price__isnull=True).values_list("model_name", flat=True))
    )


def _finalize_check(
    tenant: Tenant, invoice: Invoice, now: datetime, *, accept_unpriced: str | None = None
) -> None:
    """Raise InvoiceError, saying why, if a draft just built cannot be finalized at `now`:
    its month has not ended, an earlier month's usage is not invoiced yet, or some of its
    usage has no price and was not accepted unbilled (`accept_unpriced`, a reason). What
    `invoice_finalize` refuses, and what a dry run predicts."""
    if now < invoice.ends_at:
        raise InvoiceError(f"{tenant.slug}'s {invoice.month:%Y-%m} has not ended yet.")
    if not invoice.lines.exists():
        # A number of the gap-free sequence for nothing: month_close never numbers one.
        raise InvoiceError(
            f"{tenant.slug} has no usage to bill in {invoice.month:%Y-%m}: nothing to number "
            "(delete the draft)."
        )
    uninvoiced = UsageEvent.objects.filter(
        BILLABLE, tenant=tenant, occurred_at__lt=invoice.starts_at
    )
    if invoice.previous_ends_at is not None:
        uninvoiced = uninvoiced.filter(occurred_at__gte=invoice.previous_ends_at)
    earliest = uninvoiced.order_by("occurred_at").values_list("occurred_at", flat=True).first()
    if earliest is not None and invoice.corrects_id is None:
        month_of = timezone.localtime(earliest, ZoneInfo(invoice.timezone))
        raise InvoiceError(
            f"{tenant.slug}'s usage of {month_of:%Y-%m} is not invoiced yet: months close in order."
        )
    if invoice.unpriced_tokens and not accept_unpriced:
        models = unpriced_models(invoice)
        named = f" ({', '.join(models)})" if models else ""
        # No price can reach these tokens any more: an event keeps the price version (and
        # its unpriced count) it was recorded with, and a new version starts in the future
        # (routing.services.price_start_check). Say so, rather than advise pricing them,
        # and say the one way out: a superuser accepts them unbilled, with a reason.
        raise InvoiceError(
            f"{invoice.unpriced_tokens} tokens of {tenant.slug}'s {invoice.month:%Y-%m} have no "
            f"price{named}. A usage event keeps the price version it was "
            "recorded with and a new price starts in the future, so no price set now bills "
            "them. This month, and every later one (months close in order), is finalized "
            "only if a superuser accepts them unbilled, saying why: "
            f'close_month {invoice.month:%Y-%m} --tenant {tenant.slug} --accept-unpriced "REASON", '
            'or {"accept_unpriced": "REASON"} to the API\'s finalize, or the admin\'s '
            '"Finalize selected drafts, accepting their unpriced usage unbilled" on the draft. '
            "Price these models now so that new usage is billed."
        )


def unpriced_note(invoice: Invoice, *, accepted: str | None = None) -> str:
    """What an invoice says of its unpriced tokens ("" if none): how many were not billed,
    of which models, and, once accepted, by whom and why. `accepted`: a reason not yet
    stored (a dry run's)."""
    if not invoice.unpriced_tokens:
        return ""
    models = unpriced_models(invoice)
    named = f" ({', '.join(models)})" if models else ""
    note = f"{invoice.unpriced_tokens} tokens{named} are not billed: they have no price"
    reason = accepted or invoice.unpriced_accepted
    if reason:
        by = invoice.unpriced_accepted_by if not accepted else ""
        note += f"; accepted unbilled{f' by {by}' if by else ''}: {reason}"
    return note


def _locked(invoice: Invoice) -> Invoice:
    """The invoice read again under a row lock, in the caller's transaction: two staff
    acting on it at once are serialized and the second sees the first's change."""
    return Invoice.objects.select_for_update().select_related("tenant").get(pk=invoice.pk)


@transaction.atomic
def invoice_mark_paid(*, invoice: Invoice, at: datetime | None = None) -> Invoice:
    invoice = _locked(invoice)
    if invoice.status != Invoice.Status.FINALIZED:
        raise InvoiceError(f"Only a finalized invoice can be paid; {invoice} is {invoice.status}.")
    now = timezone.now()
    at = at or now
    if not invoice.finalized_at <= at <= now:
        raise InvoiceError(
            f"{invoice} can be paid between its finalization "
            f"({invoice.finalized_at.isoformat()}) and now, not at {at.isoformat()}."
        )
    invoice.status = Invoice.Status.PAID
    invoice.paid_at = at
    invoice.save()
    return invoice


@transaction.atomic
def invoice_void(*, invoice: Invoice, reason: str) -> Invoice:
    """Void a numbered invoice; it keeps its number. `invoice_correct` replaces it."""
    invoice = _locked(invoice)
    if invoice.status not in (Invoice.Status.FINALIZED, Invoice.Status.PAID):
        raise InvoiceError(
            f"Only a finalized or paid invoice can be voided; {invoice} is {invoice.status}."
        )
    if not reason.strip():
        raise InvoiceError("Say why the invoice is void.")
    if len(reason.strip()) > 500:
        raise InvoiceError("Say why the invoice is void in 500 characters at most.")
    invoice.status = Invoice.Status.VOID
    invoice.voided_at = timezone.now()
    invoice.void_reason = reason.strip()
    invoice.save()
    return invoice


@transaction.atomic
def invoice_correct(*, voided: Invoice) -> Invoice:
    """A new draft replacing a void invoice, covering exactly what it covered."""
    _tenant_locked(voided.tenant_id)
    voided = _locked(voided)
    if voided.status != Invoice.Status.VOID:
        raise InvoiceError("Only a void invoice can be corrected.")
    if hasattr(voided, "corrected_by"):
        return voided.corrected_by
    current = (
        Invoice.objects.filter(tenant=voided.tenant, month=voided.month)
        .exclude(status=Invoice.Status.VOID)
        .first()
    )
    if current is not None:
        raise InvoiceError(f"{voided.month:%Y-%m} of {voided.tenant.slug} has {current} already.")
    # A month whose only invoice is void is built as that invoice's correction.
    return invoice_build(tenant=voided.tenant, month=voided.month, now=voided.cutoff)


@dataclass(frozen=True)
class MonthClosed:
    tenant: Tenant
    # "finalized", "already numbered", "no usage", "not finalized: <why>"; a dry run's
    # "would finalize at <total> USD" or "would refuse: <why>" (and no invoice: it was
    # rolled back).
    outcome: str
    invoice: Invoice | None = None


def month_close(
    *,
    month: date,
    tenants: Iterable[Tenant] | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
    progress: Callable[[Tenant], None] | None = None,
    accept_unpriced: str | None = None,
    accepted_by: str = "",
) -> list[MonthClosed]:
    """Build and finalize each tenant's invoice for a month (by default every tenant).

    Running it again changes nothing. A dry run builds each invoice, applies the checks
    finalizing would, and rolls it back. A tenant that cannot be finalized (unpriced usage,
    an earlier month still open) is reported and skipped; the others go on.
    `accept_unpriced`: finalize unpriced usage unbilled with this reason (see
    `invoice_finalize`); the scheduled task never gives one.
    """
    now = now or timezone.now()
    accept_unpriced = _acceptance(accept_unpriced)
    results = []
    for tenant in tenants if tenants is not None else Tenant.objects.order_by("slug"):
        results.append(_close_one(tenant, month, now, dry_run, accept_unpriced, accepted_by))
        if progress:
            progress(tenant)
    return results


class _DryRun(Exception):
    pass


def _close_one(
    tenant: Tenant,
    month: date,
    now: datetime,
    dry_run: bool,
    accept_unpriced: str | None = None,
    accepted_by: str = "",
) -> MonthClosed:
    try:
        with transaction.atomic():
            voided = _void_awaiting_correction(_tenant_locked(tenant.pk), month)
            if voided is not None:
                # Voided on purpose (a dispute, a wrong address): billed again by its
                # correction (invoice_correct), which someone decides on, never by a
                # re-run of the month's close.
                return MonthClosed(tenant, "void, awaiting its correction", voided)
            # With the margin a dry run too: it shows what the real run would finalize.
            invoice = invoice_build(tenant=tenant, month=month, now=now, finalizing=True)
            if invoice.status != Invoice.Status.DRAFT:
                return MonthClosed(tenant, "already numbered", invoice)
            if draft_dropped_if_empty(invoice):
                return MonthClosed(tenant, "no usage")
            if dry_run:
                _finalize_check(tenant, invoice, now, accept_unpriced=accept_unpriced)
                outcome = f"would finalize at {invoice.total} USD"
                if invoice.unpriced_tokens:
                    outcome += f", {unpriced_note(invoice, accepted=accept_unpriced)}"
                result = MonthClosed(tenant, outcome)
                raise _DryRun
            invoice = invoice_finalize(
                invoice=invoice,
                now=now,
                built=True,
                accept_unpriced=accept_unpriced,
                accepted_by=accepted_by,
            )
            return MonthClosed(tenant, "finalized", invoice)
    except _DryRun:
        return result
    except InvoiceError as exc:
        return MonthClosed(tenant, f"{'would refuse' if dry_run else 'not finalized'}: {exc}")


def draft_dropped_if_empty(invoice: Invoice) -> bool:
    """Delete a draft with no line (the tenant has nothing to bill that month): month
    closes and the admin's builds keep no empty draft, which would take a number."""
    if invoice.status != Invoice.Status.DRAFT or invoice.lines.exists():
        return False
    invoice.delete()
    return True


def _void_awaiting_correction(tenant: Tenant, month: date) -> Invoice | None:
    """The month's latest void invoice when nothing else (a correction, numbered or
    draft) stands for the month."""
    invoices = Invoice.objects.filter(tenant=tenant, month=month)
    if invoices.exclude(status=Invoice.Status.VOID).exists():
        return None
    return invoices.order_by("-voided_at").first()


def _month_of(instant: datetime, tz_name: str) -> date:
    """The calendar month (its first day) of an instant in a time zone."""
    return budget_month(instant, tz_name)[0].astimezone(ZoneInfo(tz_name)).date()


def months_due(*, now: datetime | None = None) -> list[tuple[Tenant, date]]:
    """For each tenant, the earliest month to close, if any: the first month after its
    latest numbered invoice that has usage to bill (its own, or usage of an invoiced
    month that arrived late, billed as adjustments), once it ended in the tenant's time
    zone more than the grace period ago. A month missed (beat down, a refusal since
    fixed) is thus closed before the next one, in order."""
    now = now or timezone.now()
    grace = timedelta(seconds=settings.TOLLGATE_INVOICE_GRACE_SECONDS)
    due = []
    for tenant in Tenant.objects.order_by("slug"):
        events = UsageEvent.objects.filter(BILLABLE, tenant=tenant)
        last = (
            Invoice.objects.filter(tenant=tenant)
            .exclude(status=Invoice.Status.DRAFT)
            .order_by("-month", "-cutoff")
            .first()
        )
        new = events if last is None else events.filter(occurred_at__gte=last.ends_at)
        first_new = new.order_by("occurred_at").values_list("occurred_at", flat=True).first()
        # The month after the last invoice's, however the tenant's time zone reads its
        # end now: moved west, that end is still in the invoiced month.
        after_last = _month_after(last.month) if last is not None else None
        candidates = []
        if first_new is not None:
            month = _month_of(first_new, tenant.timezone)
            candidates.append(max(month, after_last) if after_last else month)
        if (
            last is not None
            and events.filter(occurred_at__lt=last.ends_at, recorded_at__gt=last.cutoff).exists()
        ):
            candidates.append(after_last)
        if not candidates:
            continue
        month = min(candidates)
        if now >= month_bounds(month, tenant.timezone)[1] + grace:
            due.append((tenant, month))
    return due
