"""Usage -> disjoint token buckets -> cost. Integers and Decimals only.

Providers report OpenAI-style usage: cached tokens counted inside `prompt_tokens`,
reasoning tokens inside `completion_tokens`. Each provider spells the cached count its
own way (see the conformance guide); `usage_normalize` reads them all and splits the
totals into disjoint buckets, so that nothing is counted twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

# Costs keep 12 decimal places: a $0.000001-per-1M price times one token is exact.
COST_PLACES = Decimal("1e-12")


@dataclass(frozen=True)
class TokenBuckets:
    input_uncached: int = 0
    input_cached: int = 0
    output: int = 0  # completion tokens other than reasoning
    reasoning: int = 0

    @property
    def prompt(self) -> int:
        return self.input_uncached + self.input_cached

    @property
    def completion(self) -> int:
        return self.output + self.reasoning


# More than any one call can use (a million times a 1M-token context), and far inside
# the ledger's 64-bit columns: a count above it is garbage, not usage.
COUNT_MAX = 10**12


def _count(value: object) -> int | None:
    """A token count from provider JSON: an int from 0 to COUNT_MAX (or a whole float, or
    the digits of one in a string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not value.is_integer():  # NaN and infinities included
            return None
        value = int(value)
    elif isinstance(value, str):
        if not (value.isascii() and value.isdigit() and len(value) <= len(str(COUNT_MAX))):
            return None
        value = int(value)
    elif not isinstance(value, int):
        return None
    return value if 0 <= value <= COUNT_MAX else None


_COUNTS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "prompt_cache_hit_tokens",
    "prompt_cache_miss_tokens",
)


def usage_reported(usage: object) -> bool:
    """Whether a provider's usage object carries token counts the gateway can read. One
    that does not (every count null, say) is no usage at all, and neither is one with a
    count it cannot read beside readable ones (a completion_tokens of 10^20 beside a
    prompt_tokens of 10 would bill no output): the call is estimated, not metered as zero
    tokens."""
    if not isinstance(usage, Mapping):
        return False
    counts = [(usage.get(k), _count(usage.get(k))) for k in _COUNTS]
    readable = any(count is not None for _, count in counts)
    garbled = any(raw is not None and count is None for raw, count in counts)
    return readable and not garbled


def _first_count(*values: object) -> int | None:
    for value in values:
        count = _count(value)
        if count is not None:
            return count
    return None


def _mapping(value: object) -> Mapping:
    return value if isinstance(value, Mapping) else {}


def usage_normalize(usage: Mapping) -> TokenBuckets:
    """Disjoint buckets from one provider usage object (any of the four styles)."""
    hit = _count(usage.get("prompt_cache_hit_tokens"))  # DeepSeek
    miss = _count(usage.get("prompt_cache_miss_tokens"))  # DeepSeek
    prompt = _count(usage.get("prompt_tokens"))
    if prompt is None:
        prompt = (hit or 0) + (miss or 0)
    cached = _first_count(
        _mapping(usage.get("prompt_tokens_details")).get("cached_tokens"),
        hit,
        usage.get("cached_tokens"),  # Kimi's top-level spelling
    )
    cached = min(cached or 0, prompt)

    completion = _count(usage.get("completion_tokens"))
    if completion is None:
        total = _count(usage.get("total_tokens"))
        completion = max(total - prompt, 0) if total is not None else 0
    reasoning = _count(_mapping(usage.get("completion_tokens_details")).get("reasoning_tokens"))
    reasoning = min(reasoning or 0, completion)
    return TokenBuckets(
        input_uncached=prompt - cached,
        input_cached=cached,
        output=completion - reasoning,
        reasoning=reasoning,
    )


def usage_openai_shape(usage: Mapping, buckets: TokenBuckets) -> dict:
    """The provider's usage object with OpenAI's standard fields filled in from the buckets.

    Provider-specific fields (e.g. prompt_cache_hit_tokens) are kept.
    """
    shaped = dict(usage)
    shaped["prompt_tokens"] = buckets.prompt
    shaped["completion_tokens"] = buckets.completion
    shaped["total_tokens"] = buckets.prompt + buckets.completion
    shaped["prompt_tokens_details"] = {
        **_mapping(usage.get("prompt_tokens_details")),
        "cached_tokens": buckets.input_cached,
    }
    shaped["completion_tokens_details"] = {
        **_mapping(usage.get("completion_tokens_details")),
        "reasoning_tokens": buckets.reasoning,
    }
    return shaped


@dataclass(frozen=True)
class Charge:
    cost: Decimal
    unpriced_tokens: int  # tokens in buckets whose price is unset: metered, not charged


def usage_charge(
    buckets: TokenBuckets,
    *,
    input_per_mtok: Decimal | None,
    cached_input_per_mtok: Decimal | None,
    output_per_mtok: Decimal | None,
) -> Charge:
    """The exact cost of the buckets at prices in USD per 1M tokens.

    Cached input without its own price is billed at the input price. Reasoning is billed
    as output.
    """
    if cached_input_per_mtok is None:
        cached_input_per_mtok = input_per_mtok
    total = Decimal(0)
    unpriced = 0
    for tokens, unit in (
        (buckets.input_uncached, input_per_mtok),
        (buckets.input_cached, cached_input_per_mtok),
        (buckets.completion, output_per_mtok),
    ):
        if not tokens:
            continue
        if unit is None:
            unpriced += tokens
            continue
        total += tokens * unit
    # scaleb shifts the exponent: an exact division by 10**6.
    return Charge(cost=total.scaleb(-6).quantize(COST_PLACES), unpriced_tokens=unpriced)


def tokens_estimate(content: object) -> int:
    """A rough token count of messages or output, for when the provider reports none:
    about four characters a token."""
    text = json.dumps(content, ensure_ascii=False, separators=(",", ":"))
    return max(1, (len(text) + 3) // 4)
