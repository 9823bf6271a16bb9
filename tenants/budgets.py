"""Monthly budgets: reserve before the upstream call, settle after it, alert on thresholds.

Invariant: the spent amount of a hard budget never exceeds its limit, whatever the
concurrency. Before a call, `budget_reserve` adds the call's worst-case cost to the
period's reserved amount in one conditional UPDATE that matches no row when it does not
fit (PostgreSQL re-checks the condition against the row a concurrent transaction just
committed; SQLite runs write transactions one at a time). After the call,
`budget_settle`, in the transaction that writes the usage event, moves the actual cost
to spent and releases the rest. Spent therefore always equals the sum of the ledger's
costs for the period, and `budget_rebuild` can recompute it from there.
"""

from __future__ import annotations

import calendar
import math
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal
from zoneinfo import ZoneInfo

from cachetools import LRUCache
from django.db import transaction
from django.db.models import F, Sum
from django.utils import timezone

from config.db import Statement, run_together
from routing.config_cache import ConfigCache

from . import statements
from .models import PICO, ApiKey, Budget, BudgetAlert, BudgetPeriod, BudgetReservation, Tenant

_budgets = ConfigCache(maxsize=100_000)


class BudgetExceeded(Exception):
    """A call whose worst-case cost does not fit a hard budget."""

    def __init__(self, budget: Budget, period: BudgetPeriod, needed_pico: int):
        self.budget = budget
        self.period = period
        self.needed_pico = needed_pico
        self.remaining = pico_to_usd(
            max(budget.limit_pico - period.spent_pico - period.reserved_pico, 0)
        )
        super().__init__(self.message)

    @property
    def message(self) -> str:
        # "Cannot cover", not "exhausted": a limit below one call's worst case refuses it
        # with nothing spent.
        return (
            f"The monthly budget of {budget_scope(self.budget)} cannot cover this request: "
            f"limit {usd_format(self.budget.limit_usd)}, {usd_format(self.remaining)} left "
            f"until {self.period.ends_at:%Y-%m-%d %H:%M} UTC, and the request may cost up to "
            f"{usd_format(pico_to_usd(self.needed_pico))}."
        )

    def skip_reason(self, bound: Decimal) -> str:
        return budget_skip_reason(
            bound, budget=self.budget, remaining=self.remaining, ends_at=self.period.ends_at
        )


def budget_scope(budget: Budget) -> str:
    """Whose budget, as a refusal names it: "API key tg-ab12…" or "this tenant"."""
    return f"API key {budget.api_key.prefix}…" if budget.api_key_id else "this tenant"


def budget_skip_reason(
    bound: Decimal, *, budget: Budget, remaining: Decimal, ends_at: datetime
) -> str:
    """Why a route skips a target whose worst-case cost (`bound`) the budget cannot cover:
    the budget named with its limit, as a direct call's refusal names it."""
    return (
        f"may cost up to {usd_format(bound)}, more than the {usd_format(remaining)} left "
        f"until {ends_at:%Y-%m-%d %H:%M} UTC in the monthly budget of {budget_scope(budget)} "
        f"(limit {usd_format(budget.limit_usd)})"
    )


def places_at_least(amount: Decimal, places: int = 2) -> Decimal:
    """12.5 -> 12.50, 3 -> 3.00, 0.000042000 -> 0.000042: at least `places` decimals,
    every significant digit kept."""
    amount = amount.normalize()
    if amount.as_tuple().exponent > -places:
        # Precision for every digit: a worst-case bound can be far beyond the default 28.
        digits = Context(prec=max(amount.adjusted() + places + 1, 28))
        amount = amount.quantize(Decimal(1).scaleb(-places), context=digits)
    return amount


def usd_format(amount: Decimal) -> str:
    """$12.50, $3.00, $0.000042: cents at least, every significant digit kept."""
    return f"${places_at_least(amount):,f}"


def usd_str(amount: Decimal) -> str:
    """An amount as JSON carries it: every digit, never an exponent (str() of no
    picodollars is "0E-12", of $0.00000015 "1.50000E-7")."""
    return f"{amount:f}"


def pico_to_usd(pico: int) -> Decimal:
    return Decimal(pico).scaleb(-12)


def usd_to_pico(amount: Decimal) -> int:
    """Whole picodollars, rounded up: a reservation never falls short."""
    return math.ceil(amount * PICO)


def budget_month(at: datetime, tz_name: str) -> tuple[datetime, datetime]:
    """[start, end) of the calendar month holding `at` in the time zone, in UTC."""
    tz = ZoneInfo(tz_name)
    local = at.astimezone(tz)
    start = datetime(local.year, local.month, 1, tzinfo=tz)
    days = calendar.monthrange(local.year, local.month)[1]
    end = (start.replace(tzinfo=None) + timedelta(days=days)).replace(tzinfo=tz)
    return start.astimezone(UTC), end.astimezone(UTC)


def budgets_for_key(*, tenant_id: int, key_id: int, version: int | None) -> tuple[Budget, ...]:
    """The budgets that apply to a key's calls: its tenant's, then its own.

    Cached per tenant budget version (`Tenant.budget_version`, which the key lookup
    reads on every request), so a change applies from the next request everywhere. A
    tenant that never had a budget costs no query at all. `version=None` reads it.
    """
    if version is None:
        version = Tenant.objects.values_list("budget_version", flat=True).get(pk=tenant_id)
    if version == 0:
        return ()

    def load() -> tuple[Budget, ...]:
        budgets = Budget.objects.filter(tenant_id=tenant_id, api_key__isnull=True) | (
            Budget.objects.filter(api_key_id=key_id)
        )
        return tuple(sorted(budgets.select_related("api_key"), key=lambda b: b.api_key_id or 0))

    return _budgets.get_or_load((tenant_id, key_id, version), load)


def budget_version_bump(*, sender, instance: Budget, **kwargs) -> None:
    """Connected to Budget's post_save and post_delete signals."""
    Tenant.objects.filter(pk=instance.tenant_id).update(budget_version=F("budget_version") + 1)


_period_ids: LRUCache = LRUCache(maxsize=100_000)
_period_ids_lock = threading.Lock()


def budget_period(
    budget: Budget, at: datetime, tz_name: str, *, in_flight: str | None = None
) -> BudgetPeriod:
    """The budget's counters for the month holding `at`, created on first use with what
    the ledger already holds for that month (but the call `in_flight`, settled next)."""
    starts_at, ends_at = budget_month(at, tz_name)
    period = BudgetPeriod.objects.filter(budget=budget, starts_at=starts_at).first()
    if period is None:
        spent = _ledger_spent_pico(budget, starts_at, ends_at, excluding=in_flight)
        period, _ = BudgetPeriod.objects.get_or_create(
            budget=budget, starts_at=starts_at, defaults={"ends_at": ends_at, "spent_pico": spent}
        )
    return period


def _period_id(
    budget: Budget,
    at: datetime,
    tz_name: str,
    *,
    in_flight: str | None = None,
    forget: bool = False,
) -> int:
    """`budget_period(...).pk`, remembered: a period row never changes its identity.
    `forget` drops the remembered id first (its row was deleted by hand)."""
    slot = (budget.pk, budget_month(at, tz_name)[0])
    with _period_ids_lock:
        if forget:
            _period_ids.pop(slot, None)
        period_id = _period_ids.get(slot)
    if period_id is None:
        period_id = budget_period(budget, at, tz_name, in_flight=in_flight).pk
        with _period_ids_lock:
            _period_ids[slot] = period_id
    return period_id


def hard_budgets(key: ApiKey) -> list[Budget]:
    """The hard budgets over the key's calls (cached with `budgets_for_key`)."""
    budgets = budgets_for_key(
        tenant_id=key.tenant_id, key_id=key.pk, version=key.tenant_budget_version
    )
    return [b for b in budgets if b.hard]


class BudgetHold:
    """`budget_reserve` as statements, for a caller to send with its own in one round trip
    (config.db.run_together) in its transaction, then ask `held()`. When it is False the
    caller rolls back and reserves step by step with `budget_reserve`, which tells which
    budget refused the call."""

    def __init__(
        self, *, key: ApiKey, tz_name: str, request_id: str, at: datetime, amount: Decimal
    ):
        hard = [(budget, _period_id(budget, at, tz_name)) for budget in hard_budgets(key)]
        needed = usd_to_pico(amount) if hard else 0
        # More than a limit never fits, and may be more than the database's integers hold
        # (a max_tokens of 10^14): no statement, and step by step says which budget.
        self._fits = all(needed <= budget.limit_pico for budget, _ in hard)
        self.holds = {period_id: needed for _, period_id in hard} if self._fits else {}
        self._reserves = [
            statements.period_reserve_statement(
                period_id=period_id, amount_pico=needed, limit_pico=budget.limit_pico
            )
            for budget, period_id in hard
            if self._fits
        ]
        self.statements = list(self._reserves)
        if self.holds:
            self.statements.append(
                statements.reservations_insert_statement(
                    request_id=request_id, holds=self.holds, at=timezone.now()
                )
            )

    def held(self) -> bool:
        return self._fits and all(reserve.rowcount == 1 for reserve in self._reserves)


def budget_reserve(
    *, key: ApiKey, tz_name: str, request_id: str, at: datetime, amount: Decimal
) -> dict[int, int]:
    """Hold `amount` against every hard budget of the key's calls, or none of them.

    Raises BudgetExceeded (holding nothing) when it does not fit one of them. Returns the
    holds, {period id: picodollars}, for `budget_settle`; empty when nothing was held.
    """
    hard = hard_budgets(key)
    if not hard:
        return {}
    needed = usd_to_pico(amount)
    holds = {}
    with transaction.atomic(savepoint=False):  # the caller's transaction, if any
        for budget in hard:
            period_id = _period_id(budget, at, tz_name)
            if needed > budget.limit_pico:  # never fits (see BudgetHold)
                raise BudgetExceeded(budget, BudgetPeriod.objects.get(pk=period_id), needed)
            reserved = statements.period_reserve(
                period_id=period_id, amount_pico=needed, limit_pico=budget.limit_pico
            )
            if not reserved:
                period = BudgetPeriod.objects.filter(pk=period_id).first()
                if period is None:  # deleted since we remembered it: find it again
                    period_id = _period_id(budget, at, tz_name, forget=True)
                    reserved = statements.period_reserve(
                        period_id=period_id, amount_pico=needed, limit_pico=budget.limit_pico
                    )
                    period = BudgetPeriod.objects.get(pk=period_id)
                if not reserved:
                    raise BudgetExceeded(budget, period, needed)
            holds[period_id] = needed
        statements.reservations_insert(request_id=request_id, holds=holds, at=timezone.now())
    return holds


class BudgetSettlement:
    """`budget_settle` in two steps, so that its writes can go to the database with the
    caller's (the usage event's INSERT) in one round trip: run `statements` in the
    transaction that writes the call's usage event (config.db.run_together), then call
    `finish()` in it (alerts, and a period deleted by hand since it was looked up)."""

    def __init__(
        self,
        *,
        budgets: tuple[Budget, ...],
        tz_name: str,
        request_id: str,
        at: datetime,
        cost: Decimal,
        holds: dict[int, int] | None = None,
    ):
        self.cost_pico = int(cost * PICO)  # costs have twelve decimal places: exact
        if holds is None:
            holds = dict(
                BudgetReservation.objects.filter(request_id=request_id).values_list(
                    "period_id", "amount_pico"
                )
            )
        self._where = {"tz_name": tz_name, "in_flight": request_id}
        self._request_id = request_id
        self._at = at
        self._holds = holds
        self._settles: list[tuple[Budget, int, Statement]] = []
        for budget in budgets:
            period_id = _period_id(budget, at, tz_name, in_flight=request_id)
            held = holds.get(period_id, 0)
            if not held and not self.cost_pico:
                continue
            statement = statements.period_settle_statement(
                period_id=period_id,
                request_id=request_id if held else None,
                cost_pico=self.cost_pico,
            )
            self._settles.append((budget, period_id, statement))
        self.statements = [statement for _, _, statement in self._settles]
        if holds:
            self.statements.insert(0, statements.reservations_lock_statement(request_id=request_id))
            self.statements.append(statements.reservations_delete_statement(request_id=request_id))

    def finish(self) -> None:
        for budget, period_id, statement in self._settles:
            spent = statement.row[0] if statement.row else None
            if spent is None:  # deleted since we remembered it: find it again
                period_id = _period_id(budget, self._at, **self._where, forget=True)
                spent = statements.period_settle(
                    period_id=period_id,
                    request_id=self._request_id if self._holds.get(period_id) else None,
                    cost_pico=self.cost_pico,
                )
            if self.cost_pico:
                budget_alerts_fire(
                    budget=budget, period_id=period_id, before=spent - self.cost_pico, after=spent
                )


def budget_settle(
    *,
    budgets: tuple[Budget, ...],
    tz_name: str,
    request_id: str,
    at: datetime,
    cost: Decimal,
    holds: dict[int, int] | None = None,
) -> None:
    """Move a finished call's cost into spent on every budget that covers it, releasing
    its holds (as `budget_reserve` returned them; None: look them up). Call it inside the
    transaction that writes the call's usage event (`usage_record` runs it as a
    BudgetSettlement, with the event's INSERT)."""
    settlement = BudgetSettlement(
        budgets=budgets, tz_name=tz_name, request_id=request_id, at=at, cost=cost, holds=holds
    )
    with transaction.atomic(savepoint=False):
        run_together(settlement.statements)
        settlement.finish()


def budget_release(*, request_id: str, older_than: datetime | None = None) -> bool:
    """Release the holds of a call that never reached the ledger (with `older_than`: only
    if none was renewed since). Releases what its own DELETE took, so a settlement of
    the same call at the same moment is never released twice. Whether it released any."""
    with transaction.atomic():
        taken = dict(statements.reservations_take(request_id=request_id, older_than=older_than))
        # The periods in the order admission and settlement lock them (budgets_for_key:
        # the tenant's budget, then the key's), or a call of the key being admitted now
        # and this could each wait for the other.
        order = BudgetPeriod.objects.filter(pk__in=taken).values_list("pk", "budget__api_key_id")
        for period_id, _ in sorted(order, key=lambda row: row[1] or 0):
            BudgetPeriod.objects.filter(pk=period_id).update(
                reserved_pico=F("reserved_pico") - taken[period_id]
            )
    return bool(taken)


def budget_alerts_fire(*, budget: Budget, period_id: int, before: int, after: int) -> None:
    """Record (and notify, after commit) each threshold that spent crossed."""
    limit = budget.limit_pico
    crossed = sorted({t for t in budget.alert_thresholds if before < limit * t // 100 <= after})
    if not crossed:  # nearly every call
        return
    from .tasks import budget_alert_queue

    for threshold in crossed:
        alert, created = BudgetAlert.objects.get_or_create(
            period_id=period_id, threshold=threshold, defaults={"spent_pico": after}
        )
        if created:
            # Robust: the call's usage is committed by then, and a broker that cannot
            # be reached must not turn its answer into an error (the SDK would retry it,
            # billed twice). The alert stays unqueued, and beat queues it later.
            transaction.on_commit(lambda pk=alert.pk: budget_alert_queue(pk), robust=True)


@dataclass(frozen=True)
class BudgetStatus:
    budget: Budget
    period_start: datetime
    period_end: datetime
    spent: Decimal
    reserved: Decimal

    @property
    def remaining(self) -> Decimal:
        # Floored at picodollars' zero, so that usd_str writes it as it writes spent.
        return max(self.budget.limit_usd - self.spent - self.reserved, pico_to_usd(0))

    @property
    def used_percent(self) -> Decimal:
        return (self.spent * 100 / self.budget.limit_usd).quantize(Decimal("0.1"))


def budget_status(
    budget: Budget, *, at: datetime | None = None, tz_name: str | None = None
) -> BudgetStatus:
    """The budget's counters for the month holding `at` (default now)."""
    at = at or timezone.now()
    starts_at, ends_at = budget_month(at, tz_name or budget.tenant.timezone)
    period = BudgetPeriod.objects.filter(budget=budget, starts_at=starts_at).first()
    return BudgetStatus(
        budget=budget,
        period_start=starts_at,
        period_end=ends_at,
        spent=pico_to_usd(period.spent_pico if period else 0),
        reserved=pico_to_usd(period.reserved_pico if period else 0),
    )


@transaction.atomic
def budget_set(
    *,
    tenant: Tenant,
    limit_usd: Decimal,
    key: ApiKey | None = None,
    hard: bool = True,
    alert_thresholds: list[int] | None = None,
) -> Budget:
    """Create or change the monthly budget of a tenant or of one of its keys."""
    if key is not None and key.tenant_id != tenant.pk:
        raise ValueError("The key belongs to another tenant.")
    budget = Budget.objects.filter(tenant=tenant, api_key=key).first() or Budget(
        tenant=tenant, api_key=key
    )
    budget.limit_usd = limit_usd
    budget.hard = hard
    if alert_thresholds is not None:
        budget.alert_thresholds = sorted(set(alert_thresholds))
    budget.full_clean()
    budget.save()
    # A new budget counts the month's usage so far, as `budget_rebuild` would.
    period = budget_period(budget, timezone.now(), tenant.timezone)
    # Thresholds the month's spending already passes under this limit alert now.
    if period.spent_pico:
        budget_alerts_fire(budget=budget, period_id=period.pk, before=0, after=period.spent_pico)
    return budget


def _ledger_spent_pico(
    budget: Budget, starts_at: datetime, ends_at: datetime, *, excluding: str | None = None
) -> int:
    from billing.models import UsageEvent

    events = UsageEvent.objects.filter(
        tenant_id=budget.tenant_id, occurred_at__gte=starts_at, occurred_at__lt=ends_at
    )
    if budget.api_key_id:
        events = events.filter(api_key_id=budget.api_key_id)
    if excluding:
        events = events.exclude(request_id=excluding)
    # Summed as Decimals in Python: exact on every database.
    return sum(int(cost * PICO) for cost in events.values_list("cost", flat=True))


@dataclass(frozen=True)
class BudgetDrift:
    period: BudgetPeriod
    live_pico: int
    ledger_pico: int


def budget_rebuild(*, fix: bool = False) -> list[BudgetDrift]:
    """Recompute every period's spent from the usage ledger; report (and optionally fix)
    the periods whose live counter differs."""
    drifts = []
    for period in BudgetPeriod.objects.select_related("budget"):
        ledger_pico = _ledger_spent_pico(period.budget, period.starts_at, period.ends_at)
        if ledger_pico != period.spent_pico:
            drifts.append(BudgetDrift(period, period.spent_pico, ledger_pico))
            if fix:
                BudgetPeriod.objects.filter(pk=period.pk).update(spent_pico=ledger_pico)
    return drifts


def budget_holds_renew(*, request_id: str, now: datetime) -> None:
    """A call still under way (a long stream) says so: its holds are not a dead
    process's."""
    statements.reservations_renew(request_id=request_id, at=now)


def budget_holds_expire(*, older_than: timedelta) -> int:
    """Release holds of calls that never settled (their process died): none renewed
    for `older_than`. Returns how many."""
    cutoff = timezone.now() - older_than
    released = 0
    for request_id in set(
        BudgetReservation.objects.filter(created_at__lt=cutoff).values_list("request_id", flat=True)
    ):
        # Renewed since it was listed (a stream still running): left alone.
        released += budget_release(request_id=request_id, older_than=cutoff)
    return released


def reserved_total_pico() -> int:
    """All money currently held, across every budget (0 when no call is under way)."""
    return BudgetPeriod.objects.aggregate(total=Sum("reserved_pico"))["total"] or 0
