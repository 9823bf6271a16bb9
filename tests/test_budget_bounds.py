"""A hard budget holds a call's worst case before it reaches the provider: the bound on
its input covers everything the provider bills as input, not only the messages' text."""

from __future__ import annotations

from decimal import Decimal

import openai
import pytest

from billing.models import UsageEvent
from tenants.budgets import budget_set, budget_status

MESSAGES = [{"role": "user", "content": "hello there world"}]

# 100 tool definitions, about 45 kB of JSON: a provider puts them into the prompt.
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": f"tool_{i}",
            "description": "Looks something up. " * 20,
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    }
    for i in range(100)
]


def test_tool_definitions_count_toward_the_worst_case(world):
    # m-openai: $0.27 per 1M input tokens. The messages alone bound the input at about
    # 50 tokens; with the tools, 45,000, about $0.012.
    budget = budget_set(tenant=world.tenant, limit_usd=Decimal("0.005"))
    client = world.client()

    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model="m-openai",
            messages=MESSAGES,
            tools=TOOLS,
            max_tokens=10,
            # What a provider bills for those tools: about 10,000 prompt tokens, $0.0027.
            extra_body={"mock": {"usage": {"prompt_tokens": 10_000}}},
        )

    assert caught.value.code == "insufficient_quota"
    assert UsageEvent.objects.count() == 0  # nothing reached the provider
    # The same call without the tools fits, and the budget is never overspent.
    client.chat.completions.create(model="m-openai", messages=MESSAGES, max_tokens=10)
    status = budget_status(budget)
    assert 0 < status.spent <= budget.limit_usd
    assert status.reserved == 0


def test_an_image_part_holds_the_whole_context_window(world):
    # A few bytes of URL may cost thousands of tokens: the input is bounded by the
    # model's context window, 128,000 tokens at $0.27 per 1M, about $0.035.
    budget_set(tenant=world.tenant, limit_usd=Decimal("0.02"))
    image = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.test/a.png"}},
    ]
    client = world.client()

    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model="m-openai", messages=[{"role": "user", "content": image}], max_tokens=10
        )

    assert caught.value.code == "insufficient_quota"
    assert "may cost up to $0.03" in caught.value.message
    assert UsageEvent.objects.count() == 0
    # Text parts alone are bounded by their size, and fit.
    text_only = [{"role": "user", "content": [image[0]]}]
    client.chat.completions.create(model="m-openai", messages=text_only, max_tokens=10)
    assert UsageEvent.objects.count() == 1


def test_text_beyond_the_catalogs_context_window_is_held_in_full(world):
    # The catalog's context window may understate the provider's (the seeded catalog says
    # 128K for models that take 256K): a text's size bounds its tokens on its own, so the
    # window never caps it. Here a 1,000-token window and 8 kB of text: about $0.0022.
    model = world.models["openai"]
    model.context_window = 1_000
    model.save()
    budget_set(tenant=world.tenant, limit_usd=Decimal("0.001"))
    long_text = [{"role": "user", "content": "word " * 1_600}]

    with pytest.raises(openai.RateLimitError) as caught:
        world.client().chat.completions.create(model="m-openai", messages=long_text, max_tokens=10)

    assert caught.value.code == "insufficient_quota"
    assert UsageEvent.objects.count() == 0
