"""Health of the catalog: rolling figures per model and provider, read from the ledger.

Every upstream attempt leaves one usage event (billing.models.UsageEvent), so the ledger
already holds the live calls: what follows reads the events that occurred in the last
TOLLGATE_HEALTH_WINDOW_MINUTES, and the all-time totals behind /metrics (routing.metrics).

How the figures are read, so that a scrape every few seconds stays cheap at any traffic:

- counts and sums (requests, errors, tokens, generation time, cost) come from one
  GROUP BY over the window, per model, provider and chart bucket;
- percentiles come from a sample: the latest HEALTH_SAMPLE_SIZE OK calls of each model
  and provider in the window (one LIMIT query each, along the model/time index). Under
  that many calls per window the figures are exact; above it they describe the most
  recent calls, and the chart's older buckets may have no latency;
- a percentile is the nearest rank: the smallest sampled value with at least p % of the
  sample at or below it (so p50 of 1..10 is 5, p99 is 10), always a value that was seen;
- results are kept HEALTH_CACHE_SECONDS per process; `health_cache_clear` drops them.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import Case, Count, F, IntegerField, Q, Sum, Value, When
from django.db.models.functions import Greatest
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone

from billing.models import UsageEvent

from .config_cache import ConfigCache
from .models import CatalogModel, CircuitBreaker, Provider
from .upstream import PROVIDER_AT_FAULT

# OK calls per model and provider that the percentiles are taken from (the latest ones).
HEALTH_SAMPLE_SIZE = 5000
# Buckets of the per-model chart over the window.
HEALTH_BUCKETS = 12
# How long one process serves the same figures: a scrape every few seconds costs one read.
HEALTH_CACHE_SECONDS = 5.0

_OK = Q(status=UsageEvent.Status.OK)
_FAILED = Q(status=UsageEvent.Status.UPSTREAM_ERROR)
# Failed on the provider's side (routing.upstream.provider_at_fault): no answer, 429,
# 5xx, an unusable answer. Another 4xx is the request's own fault: the provider was there.
_PROVIDER_FAILED = _FAILED & PROVIDER_AT_FAULT
# Time spent generating: after the first token when streamed, else the whole call.
_GENERATION_MS = Case(
    When(
        streamed=True,
        ttft_ms__isnull=False,
        then=Greatest(F("latency_ms") - F("ttft_ms"), Value(0), output_field=IntegerField()),
    ),
    default=F("latency_ms"),
    output_field=IntegerField(),
)


@dataclass(frozen=True)
class HealthBucket:
    """One slice of the window, for the chart."""

    starts_at: datetime
    requests: int
    errors: int
    latency_p50_ms: int | None


@dataclass(frozen=True)
class ModelHealth:
    """One model as served by one provider, over the window.

    `requests` counts upstream attempts. `error_rate` is the share that failed for any
    reason (status upstream_error); `availability` the share not failed on the provider's
    side, so a 400 lowers the first and not the second. Ratios, latencies and speed are
    None without calls to measure them on.
    """

    model: str
    model_id: int
    provider: str
    requests: int
    ok: int
    errors: int
    provider_errors: int
    error_rate: float | None
    availability: float | None
    latency_p50_ms: int | None
    latency_p99_ms: int | None
    ttft_p50_ms: int | None
    output_tokens_per_second: float | None
    completion_tokens: int  # output + reasoning tokens of the OK calls
    generation_ms: int  # their generation time (see _GENERATION_MS)
    cost: Decimal
    sampled: int  # OK calls the latency percentiles come from
    breaker_state: str  # closed, open or half-open
    breaker_failures: int
    breaker_times_opened: int
    breaker_open_until: datetime | None
    series: tuple[HealthBucket, ...]


@dataclass(frozen=True)
class ProviderHealth:
    """A provider over the window, all its models together. Its percentiles come from the
    models' samples pooled; its speed is all tokens over all generation time."""

    provider: str
    models: int
    requests: int
    ok: int
    errors: int
    provider_errors: int
    error_rate: float | None
    availability: float | None
    latency_p50_ms: int | None
    latency_p99_ms: int | None
    ttft_p50_ms: int | None
    output_tokens_per_second: float | None
    cost: Decimal
    breakers_not_closed: int


@dataclass(frozen=True)
class HealthSnapshot:
    """Model and provider health as of one instant."""

    as_of: datetime
    window: timedelta
    models: tuple[ModelHealth, ...]
    providers: tuple[ProviderHealth, ...]


@dataclass(frozen=True)
class LedgerTotal:
    """All-time totals of the ledger for one model, provider and status."""

    model: str
    provider: str
    status: str
    requests: int
    input_uncached_tokens: int
    input_cached_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost: Decimal


_cache = ConfigCache(maxsize=16, ttl=HEALTH_CACHE_SECONDS)


def health_cache_clear() -> None:
    """Forget the cached figures: the next read goes to the database."""
    _cache.clear()
    _totals_base_cache.clear()


def health_window() -> timedelta:
    return timedelta(minutes=settings.TOLLGATE_HEALTH_WINDOW_MINUTES)


def health_snapshot(
    *, now: datetime | None = None, window: timedelta | None = None
) -> HealthSnapshot:
    """Model and provider health over the window ending now (default: the last
    TOLLGATE_HEALTH_WINDOW_MINUTES). Cached a few seconds unless `now` is given."""
    window = window or health_window()
    if now is not None:
        return _snapshot_load(now, window)
    return _cache.get_or_load(("snapshot", window), lambda: _snapshot_load(timezone.now(), window))


def model_health(
    *, now: datetime | None = None, window: timedelta | None = None
) -> list[ModelHealth]:
    """Per model and provider: every enabled model, and any other with calls in the
    window; ordered by model, then provider."""
    return list(health_snapshot(now=now, window=window).models)


def provider_health(
    *, now: datetime | None = None, window: timedelta | None = None
) -> list[ProviderHealth]:
    """Per provider of model_health's rows, by name."""
    return list(health_snapshot(now=now, window=window).providers)


# The all-time totals are a base, the events that occurred before a boundary some hours
# back (one full GROUP BY, redone every TOTALS_BASE_SECONDS), plus the events since the
# boundary (a range of the occurred_at index, read at each refresh). A scrape then costs
# a few hours of the ledger, not all of it. An event recorded long after it occurred
# (before the boundary) is counted from the next base on; no counter ever goes down.
TOTALS_BASE_LAG = timedelta(hours=2)
TOTALS_BASE_SECONDS = 600.0

_Key = tuple[int, int, str]
_totals_base_cache = ConfigCache(maxsize=1, ttl=TOTALS_BASE_SECONDS)


def ledger_totals() -> list[LedgerTotal]:
    """All-time requests, tokens and cost of the ledger by model, provider and status
    (cached a few seconds), for the /metrics counters."""
    return _cache.get_or_load("ledger_totals", _ledger_totals_load)


def _totals_base() -> tuple[datetime, dict[_Key, list]]:
    def load() -> tuple[datetime, dict[_Key, list]]:
        boundary = timezone.now() - TOTALS_BASE_LAG
        return boundary, _ledger_sums(UsageEvent.objects.filter(occurred_at__lt=boundary))

    return _totals_base_cache.get_or_load("base", load)


def _ledger_sums(events) -> dict[_Key, list]:
    """[requests, uncached, cached, output, reasoning, cost] by (model, provider, status)."""
    groups = (
        events.values("served_model_id", "provider_id", "status")
        .annotate(
            requests=Count("id"),
            input_uncached=Sum("input_uncached_tokens"),
            input_cached=Sum("input_cached_tokens"),
            output=Sum("output_tokens"),
            reasoning=Sum("reasoning_tokens"),
            cost=Sum("cost"),
        )
        .order_by()
    )
    return {
        (g["served_model_id"], g["provider_id"], g["status"]): [
            g["requests"],
            int(g["input_uncached"] or 0),
            int(g["input_cached"] or 0),
            int(g["output"] or 0),
            int(g["reasoning"] or 0),
            g["cost"] or Decimal(0),
        ]
        for g in groups
    }


def _ledger_totals_load() -> list[LedgerTotal]:
    boundary, base = _totals_base()
    recent = _ledger_sums(UsageEvent.objects.filter(occurred_at__gte=boundary))
    sums: dict[_Key, list] = {key: list(values) for key, values in base.items()}
    for key, values in recent.items():
        if key in sums:
            sums[key] = [a + b for a, b in zip(sums[key], values, strict=True)]
        else:
            sums[key] = list(values)
    # Names from the two small tables, not joined into the scan of the ledger.
    models = dict(
        CatalogModel.objects.filter(pk__in={k[0] for k in sums}).values_list("pk", "public_id")
    )
    providers = dict(Provider.objects.filter(pk__in={k[1] for k in sums}).values_list("pk", "name"))
    totals = [
        LedgerTotal(
            model=models[model_id],
            provider=providers[provider_id],
            status=status,
            requests=values[0],
            input_uncached_tokens=values[1],
            input_cached_tokens=values[2],
            output_tokens=values[3],
            reasoning_tokens=values[4],
            cost=values[5] if isinstance(values[5], Decimal) else Decimal(str(values[5])),
        )
        for (model_id, provider_id, status), values in sums.items()
    ]
    return sorted(totals, key=lambda t: (t.model, t.provider, t.status))


def _percentile(values: Sequence[int], p: int) -> int | None:
    """Nearest rank: the smallest value with at least p % of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-p * len(ordered) // 100))  # ceil(p/100 * n), in integers
    return ordered[rank - 1]


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _tokens_per_second(tokens: int, generation_ms: int) -> float | None:
    return tokens * 1000 / generation_ms if generation_ms > 0 else None


@dataclass
class _Counts:
    requests: int = 0
    ok: int = 0
    errors: int = 0
    provider_errors: int = 0
    completion_tokens: int = 0
    generation_ms: int = 0
    cost: Decimal = Decimal(0)


@dataclass(frozen=True)
class _Sampled:
    occurred_at: datetime
    latency_ms: int
    ttft_ms: int | None  # streamed calls only


def _snapshot_load(now: datetime, window: timedelta) -> HealthSnapshot:
    start = now - window
    width = window / HEALTH_BUCKETS
    # Bucket i holds [start + i*width, start + (i+1)*width); the last one ends at now.
    edges = [start + width * (i + 1) for i in range(HEALTH_BUCKETS - 1)]
    bucket = Case(
        *[When(occurred_at__lt=edge, then=Value(i)) for i, edge in enumerate(edges)],
        default=Value(HEALTH_BUCKETS - 1),
        output_field=IntegerField(),
    )
    in_window = UsageEvent.objects.filter(occurred_at__gte=start, occurred_at__lte=now)
    groups = (
        in_window.annotate(bucket=bucket)
        .values("served_model_id", "provider_id", "bucket")
        .annotate(
            requests=Count("id"),
            ok=Count("id", filter=_OK),
            errors=Count("id", filter=_FAILED),
            provider_errors=Count("id", filter=_PROVIDER_FAILED),
            completion_tokens=Sum(F("output_tokens") + F("reasoning_tokens"), filter=_OK),
            generation_ms=Sum(_GENERATION_MS, filter=_OK),
            cost=Sum("cost"),
        )
        .order_by()
    )
    totals: dict[tuple[int, int], _Counts] = {}
    buckets: dict[tuple[int, int], list[_Counts]] = {}
    for g in groups:
        pair = (g["served_model_id"], g["provider_id"])
        total = totals.setdefault(pair, _Counts())
        slot = buckets.setdefault(pair, [_Counts() for _ in range(HEALTH_BUCKETS)])[g["bucket"]]
        for counts in (total, slot):
            counts.requests += g["requests"]
            counts.ok += g["ok"]
            counts.errors += g["errors"]
            counts.provider_errors += g["provider_errors"]
            counts.completion_tokens += int(g["completion_tokens"] or 0)
            counts.generation_ms += int(g["generation_ms"] or 0)
            counts.cost += g["cost"] or Decimal(0)

    samples = {
        pair: _sample(in_window, *pair) if counts.ok else [] for pair, counts in totals.items()
    }

    traffic_models = {model_id for model_id, _ in totals}
    models = {
        m.pk: m
        for m in CatalogModel.objects.filter(Q(enabled=True) | Q(pk__in=traffic_models))
        .select_related("provider")
        .order_by()
    }
    provider_names = dict(
        Provider.objects.filter(pk__in={p for _, p in totals}).values_list("pk", "name")
    )
    for model in models.values():
        provider_names[model.provider_id] = model.provider.name
    # A model without calls in the window still shows, under its current provider.
    idle = {(m.pk, m.provider_id) for m in models.values() if m.pk not in traffic_models}
    pairs = set(totals) | idle
    breakers = CircuitBreaker.objects.in_bulk(list(models))

    entries = []
    for pair in pairs:
        model_id, provider_id = pair
        sample = samples.get(pair, [])
        slots = buckets.get(pair) or [_Counts() for _ in range(HEALTH_BUCKETS)]
        latencies: list[list[int]] = [[] for _ in range(HEALTH_BUCKETS)]
        for s in sample:  # the same edges as the SQL above: t < edge is before it
            latencies[bisect_right(edges, s.occurred_at)].append(s.latency_ms)
        series = tuple(
            HealthBucket(
                starts_at=start + width * i,
                requests=slot.requests,
                errors=slot.errors,
                latency_p50_ms=_percentile(latencies[i], 50),
            )
            for i, slot in enumerate(slots)
        )
        row = _model_row(
            model=models[model_id],
            provider=provider_names[provider_id],
            counts=totals.get(pair, _Counts()),
            sample=sample,
            breaker=breakers.get(model_id),
            now=now,
            series=series,
        )
        entries.append((row, sample))
    entries.sort(key=lambda entry: (entry[0].model, entry[0].provider))
    return HealthSnapshot(
        as_of=now,
        window=window,
        models=tuple(row for row, _ in entries),
        providers=tuple(_providers(entries)),
    )


def _sample(in_window, model_id: int, provider_id: int) -> list[_Sampled]:
    """The latest OK calls of one model and provider, at most HEALTH_SAMPLE_SIZE."""
    rows = (
        in_window.filter(_OK, served_model_id=model_id, provider_id=provider_id)
        .order_by("-occurred_at", "-id")
        .values_list("occurred_at", "latency_ms", "streamed", "ttft_ms")[:HEALTH_SAMPLE_SIZE]
    )
    return [
        _Sampled(occurred_at, latency, ttft if streamed else None)
        for occurred_at, latency, streamed, ttft in rows
    ]


def _model_row(
    *,
    model: CatalogModel,
    provider: str,
    counts: _Counts,
    sample: list[_Sampled],
    breaker: CircuitBreaker | None,
    now: datetime,
    series: tuple[HealthBucket, ...],
) -> ModelHealth:
    latencies = [s.latency_ms for s in sample]
    ttfts = [s.ttft_ms for s in sample if s.ttft_ms is not None]
    return ModelHealth(
        model=model.public_id,
        model_id=model.pk,
        provider=provider,
        requests=counts.requests,
        ok=counts.ok,
        errors=counts.errors,
        provider_errors=counts.provider_errors,
        error_rate=_ratio(counts.errors, counts.requests),
        availability=_ratio(counts.requests - counts.provider_errors, counts.requests),
        latency_p50_ms=_percentile(latencies, 50),
        latency_p99_ms=_percentile(latencies, 99),
        ttft_p50_ms=_percentile(ttfts, 50),
        output_tokens_per_second=_tokens_per_second(counts.completion_tokens, counts.generation_ms),
        completion_tokens=counts.completion_tokens,
        generation_ms=counts.generation_ms,
        cost=counts.cost,
        sampled=len(sample),
        breaker_state=breaker.state(now) if breaker else "closed",
        breaker_failures=breaker.consecutive_failures if breaker else 0,
        breaker_times_opened=breaker.times_opened if breaker else 0,
        breaker_open_until=breaker.open_until if breaker else None,
        series=series,
    )


def _providers(entries: list[tuple[ModelHealth, list[_Sampled]]]) -> list[ProviderHealth]:
    by_provider: dict[str, list[tuple[ModelHealth, list[_Sampled]]]] = {}
    for row, sample in entries:
        by_provider.setdefault(row.provider, []).append((row, sample))
    out = []
    for name in sorted(by_provider):
        members = [row for row, _ in by_provider[name]]
        pooled = [s for _, sample in by_provider[name] for s in sample]
        requests = sum(r.requests for r in members)
        errors = sum(r.errors for r in members)
        provider_errors = sum(r.provider_errors for r in members)
        latencies = [s.latency_ms for s in pooled]
        out.append(
            ProviderHealth(
                provider=name,
                models=len({r.model for r in members}),
                requests=requests,
                ok=sum(r.ok for r in members),
                errors=errors,
                provider_errors=provider_errors,
                error_rate=_ratio(errors, requests),
                availability=_ratio(requests - provider_errors, requests),
                latency_p50_ms=_percentile(latencies, 50),
                latency_p99_ms=_percentile(latencies, 99),
                ttft_p50_ms=_percentile([s.ttft_ms for s in pooled if s.ttft_ms is not None], 50),
                output_tokens_per_second=_tokens_per_second(
                    sum(r.completion_tokens for r in members),
                    sum(r.generation_ms for r in members),
                ),
                cost=sum((r.cost for r in members), Decimal(0)),
                breakers_not_closed=sum(1 for r in members if r.breaker_state != "closed"),
            )
        )
    return out


# --- The staff page (admin/routing/health/, wrapped in admin_view in config/urls.py) ---

SPARK_BAR = 12  # px per bucket
SPARK_HEIGHT = 28
# The page adds up every tenant's traffic and cost from the usage ledger: it is for who
# may see the ledger in the admin (superusers have every permission). admin_view only
# asks for staff status, which a tenant's member managing it through /api/ has too.
HEALTH_PERMISSION = "billing.view_usageevent"


def health_page(request):
    """Model and provider health as tables, with a small chart of each model's window:
    requests per bucket (errors in red) and their p50 latency as a line. 403 without
    HEALTH_PERMISSION, as the admin answers a page its user may not view."""
    if not request.user.has_perm(HEALTH_PERMISSION):
        raise PermissionDenied
    snapshot = health_snapshot()
    rows = [
        {
            "health": row,
            "error_rate": _percent(row.error_rate),
            "availability": _percent(row.availability),
            "tokens_per_second": _speed(row.output_tokens_per_second),
            "spark": _sparkline(row.series),
        }
        for row in snapshot.models
    ]
    providers = [
        {
            "health": p,
            "error_rate": _percent(p.error_rate),
            "availability": _percent(p.availability),
            "tokens_per_second": _speed(p.output_tokens_per_second),
        }
        for p in snapshot.providers
    ]
    return TemplateResponse(
        request,
        "admin/routing/health.html",
        {
            **admin.site.each_context(request),
            "title": "Model health",
            "opts": CatalogModel._meta,
            "changelist_url": reverse("admin:routing_catalogmodel_changelist"),
            "snapshot": snapshot,
            "window_minutes": int(snapshot.window.total_seconds() // 60),
            "bucket_minutes": snapshot.window.total_seconds() / 60 / HEALTH_BUCKETS,
            "sample_size": HEALTH_SAMPLE_SIZE,
            "cache_seconds": HEALTH_CACHE_SECONDS,
            "rows": rows,
            "providers": providers,
        },
    )


def _percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:.1f} %"


def _speed(tokens_per_second: float | None) -> str:
    return "-" if tokens_per_second is None else f"{tokens_per_second:.1f}"


def _sparkline(series: Sequence[HealthBucket]) -> dict:
    """Geometry of the inline SVG chart: a bar per bucket (its errors in red from the
    bottom), and the p50 latency as dots joined by lines, broken where a bucket has no OK
    call."""
    top = SPARK_HEIGHT - 2
    most = max((b.requests for b in series), default=0) or 1
    slowest = max((b.latency_p50_ms or 0 for b in series), default=0) or 1
    bars, lines, line, dots = [], [], [], []
    for i, b in enumerate(series):
        x = i * SPARK_BAR
        # At least a pixel for any request or error, so none is hidden by the rounding.
        height = max(1, round(b.requests / most * top)) if b.requests else 0
        error_height = max(1, round(b.errors / most * top)) if b.errors else 0
        p50 = "-" if b.latency_p50_ms is None else f"{b.latency_p50_ms} ms"
        bars.append(
            {
                "x": x,
                "y": SPARK_HEIGHT - height,
                "height": height,
                "error_y": SPARK_HEIGHT - error_height,
                "error_height": error_height,
                "title": f"{b.starts_at:%H:%M} UTC: {b.requests} requests, "
                f"{b.errors} error{'' if b.errors == 1 else 's'}, p50 {p50}",
            }
        )
        if b.latency_p50_ms is None:
            if line:
                lines.append(" ".join(line))
            line = []
            continue
        point = (x + SPARK_BAR // 2 - 1, SPARK_HEIGHT - 1 - round(b.latency_p50_ms / slowest * top))
        dots.append(point)
        line.append("{},{}".format(*point))
    if line:
        lines.append(" ".join(line))
    return {
        "width": len(series) * SPARK_BAR,
        "height": SPARK_HEIGHT,
        "bar_width": SPARK_BAR - 2,
        "bars": bars,
        "lines": lines,
        "dots": dots,
    }
