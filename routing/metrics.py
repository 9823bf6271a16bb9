"""GET /metrics: the ledger's counters and the catalog's health, in Prometheus text format.

Everything comes from the database (routing.health), so every gateway process and worker
serves the same figures and no multiprocess collection is needed. Labels are model and
provider only, never the tenant: their number stays that of the catalog.

Counters, all time (requests are upstream attempts, as in the ledger):
    tollgate_requests_total{model,provider,status}   status: ok, upstream_error,
                                                     client_cancelled
    tollgate_tokens_total{model,provider,kind}       kind: input_uncached, input_cached,
                                                     output, reasoning
    tollgate_cost_usd_total{model,provider}          summed as Decimal, a float only here
    tollgate_circuit_opens_total{model}              times the breaker opened

Gauges over the health window (TOLLGATE_HEALTH_WINDOW_MINUTES), per model and provider;
a figure without calls to measure it on is left out rather than reported as 0:
    tollgate_window_requests, tollgate_error_ratio, tollgate_availability_ratio,
    tollgate_latency_p50_seconds, tollgate_latency_p99_seconds, tollgate_ttft_p50_seconds,
    tollgate_output_tokens_per_second
    tollgate_provider_* (the same, per provider: all its models together)
    tollgate_circuit_open{model}                     1 open, 0.5 half-open, 0 closed

With TOLLGATE_METRICS_TOKEN set, a scrape needs `Authorization: Bearer <token>`. Without
it, production settings refuse every scrape (403); other settings serve it openly.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator
from decimal import Decimal

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_safe
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from .health import health_snapshot, ledger_totals

logger = logging.getLogger(__name__)

CIRCUIT_VALUE = {"closed": 0.0, "half-open": 0.5, "open": 1.0}


class TollgateCollector(Collector):
    """Reads the (briefly cached) ledger totals and health snapshot at each scrape."""

    def collect(self) -> Iterator[Metric]:
        yield from self._counters()
        yield from self._gauges()

    def _counters(self) -> Iterator[Metric]:
        labels = ["model", "provider"]
        requests = CounterMetricFamily(
            "tollgate_requests",
            "Upstream attempts recorded in the ledger.",
            labels=[*labels, "status"],
        )
        tokens = CounterMetricFamily(
            "tollgate_tokens", "Tokens recorded in the ledger.", labels=[*labels, "kind"]
        )
        cost = CounterMetricFamily("tollgate_cost_usd", "Cost charged, in USD.", labels=labels)
        cost_by_pair: dict[tuple[str, str], Decimal] = {}
        tokens_by_pair: dict[tuple[str, str, str], int] = {}
        for total in ledger_totals():
            pair = (total.model, total.provider)
            requests.add_metric([*pair, total.status], total.requests)
            cost_by_pair[pair] = cost_by_pair.get(pair, Decimal(0)) + total.cost
            for kind, count in (
                ("input_uncached", total.input_uncached_tokens),
                ("input_cached", total.input_cached_tokens),
                ("output", total.output_tokens),
                ("reasoning", total.reasoning_tokens),
            ):
                key = (*pair, kind)
                tokens_by_pair[key] = tokens_by_pair.get(key, 0) + count
        for key, count in tokens_by_pair.items():
            tokens.add_metric(list(key), count)
        for pair, amount in cost_by_pair.items():
            cost.add_metric(list(pair), float(amount))
        yield from (requests, tokens, cost)

    def _gauges(self) -> Iterator[Metric]:
        snapshot = health_snapshot()
        minutes = int(snapshot.window.total_seconds() // 60)
        per_model = _health_gauges("tollgate_", ["model", "provider"], minutes)
        per_provider = _health_gauges("tollgate_provider_", ["provider"], minutes)
        circuit = GaugeMetricFamily(
            "tollgate_circuit_open",
            "Circuit breaker: 1 open, 0.5 half-open (probing), 0 closed.",
            labels=["model"],
        )
        opens = CounterMetricFamily(
            "tollgate_circuit_opens", "Times the circuit breaker opened.", labels=["model"]
        )
        breakers_seen = set()
        for row in snapshot.models:
            _health_add(per_model, [row.model, row.provider], row)
            if row.model not in breakers_seen:  # one breaker per model, whatever the provider
                breakers_seen.add(row.model)
                circuit.add_metric([row.model], CIRCUIT_VALUE[row.breaker_state])
                opens.add_metric([row.model], row.breaker_times_opened)
        for row in snapshot.providers:
            _health_add(per_provider, [row.provider], row)
        yield from per_model.values()
        yield from per_provider.values()
        yield from (circuit, opens)


def _health_gauges(prefix: str, labels: list[str], minutes: int) -> dict[str, GaugeMetricFamily]:
    over = f"over the last {minutes} minutes"
    described = {
        "window_requests": ("window_requests", f"Upstream attempts {over}."),
        "error_rate": ("error_ratio", f"Share of attempts that failed, {over}."),
        "availability": (
            "availability_ratio",
            f"Share of attempts not failed by the provider (timeout, 429, 5xx), {over}.",
        ),
        "latency_p50": ("latency_p50_seconds", f"Median latency of OK calls, {over}."),
        "latency_p99": ("latency_p99_seconds", f"99th percentile latency of OK calls, {over}."),
        "ttft_p50": (
            "ttft_p50_seconds",
            f"Median time to first token of streamed OK calls, {over}.",
        ),
        "speed": (
            "output_tokens_per_second",
            f"Output and reasoning tokens per second of generation, {over}.",
        ),
    }
    return {
        key: GaugeMetricFamily(prefix + name, text, labels=labels)
        for key, (name, text) in described.items()
    }


def _health_add(gauges: dict[str, GaugeMetricFamily], values: list[str], row) -> None:
    """One model's or provider's figures; one without calls to measure it on is left out."""
    gauges["window_requests"].add_metric(values, row.requests)
    for name, value in (
        ("error_rate", row.error_rate),
        ("availability", row.availability),
        ("latency_p50", _seconds(row.latency_p50_ms)),
        ("latency_p99", _seconds(row.latency_p99_ms)),
        ("ttft_p50", _seconds(row.ttft_p50_ms)),
        ("speed", row.output_tokens_per_second),
    ):
        if value is not None:
            gauges[name].add_metric(values, value)


def _seconds(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000


_registry = CollectorRegistry(auto_describe=False)
_registry.register(TollgateCollector())


def _authorized(request: HttpRequest, token: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


@require_safe
def metrics_view(request: HttpRequest) -> HttpResponse:
    """Prometheus scrape endpoint. 401 without the token when one is configured; 503,
    never a 500, when the figures cannot be read (Prometheus then marks the target down)."""
    token = settings.TOLLGATE_METRICS_TOKEN
    if not token and not settings.TOLLGATE_METRICS_OPEN:
        return HttpResponse(
            "Set TOLLGATE_METRICS_TOKEN to serve /metrics, and scrape with that bearer token.\n",
            status=403,
            content_type="text/plain; charset=utf-8",
        )
    if token and not _authorized(request, token):
        return HttpResponse(
            "Send Authorization: Bearer <TOLLGATE_METRICS_TOKEN>.\n",
            status=401,
            content_type="text/plain; charset=utf-8",
            headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
        )
    try:
        body = generate_latest(_registry)
    except Exception:
        logger.exception("/metrics: the figures could not be read")
        return HttpResponse(
            "Metrics are unavailable right now.\n",
            status=503,
            content_type="text/plain; charset=utf-8",
        )
    return HttpResponse(body, content_type=CONTENT_TYPE_PLAIN_0_0_4)
