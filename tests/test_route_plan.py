"""Route plans without calling anything: the split's shares and stability, rules, the
composition of strategies, skipped targets, and the validation that refuses cycles."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest
from django.core.exceptions import ValidationError

from routing.models import Provider, Route, RouteTarget
from routing.routes import (
    RouteSpec,
    TargetDraft,
    TargetSpec,
    request_features,
    route_plan,
    route_targets_validate,
)

from .conftest import model_create


def spec(name: str, strategy: str, *targets: TargetSpec) -> RouteSpec:
    return RouteSpec(name=name, strategy=strategy, targets=targets, created=0)


def model(name: str, **kwargs) -> TargetSpec:
    return TargetSpec(
        model=name,
        route=None,
        timeout=kwargs.pop("timeout", None),
        weight=kwargs.pop("weight", 1),
        **kwargs,
    )


def sub(name: str, **kwargs) -> TargetSpec:
    return TargetSpec(
        model=None,
        route=name,
        timeout=kwargs.pop("timeout", None),
        weight=kwargs.pop("weight", 1),
        **kwargs,
    )


def everything_usable(model_id: str) -> None:
    return None


def plan_for(
    route: RouteSpec, body: dict | None = None, key: str = "req_1", usable=None, routes=None
):
    body = body or {"messages": [{"role": "user", "content": "hi"}]}
    return route_plan(
        route,
        features=request_features(body),
        split_key=key,
        usable=usable or everything_usable,
        routes=routes or {route.name: route},
    )


SEEDS_SPLIT = spec(
    "tiers",
    Route.Strategy.SPLIT,
    model("deepseek-v4-flash", weight=70),
    model("Qwen/Qwen3-VL-32B", weight=15),
    model("kimi-k2.5", weight=5),
    model("Qwen/Qwen3-32B", weight=10),
)


def test_the_weighted_split_over_10000_request_ids_is_within_2_percent_of_the_weights():
    counts = Counter(
        plan_for(SEEDS_SPLIT, key=f"req_{uuid.uuid4().hex}").candidates[0].model
        for _ in range(10_000)
    )

    shares = {name: counts[name] / 10_000 for name in counts}
    assert abs(shares["deepseek-v4-flash"] - 0.70) <= 0.02
    assert abs(shares["Qwen/Qwen3-VL-32B"] - 0.15) <= 0.02
    assert abs(shares["kimi-k2.5"] - 0.05) <= 0.02
    assert abs(shares["Qwen/Qwen3-32B"] - 0.10) <= 0.02


def test_the_same_request_id_always_lands_on_the_same_target():
    for n in range(200):
        key = f"req_{n}"
        first = plan_for(SEEDS_SPLIT, key=key).candidates
        assert all(plan_for(SEEDS_SPLIT, key=key).candidates == first for _ in range(3))


def test_a_split_target_that_cannot_be_used_gives_its_share_to_the_others():
    def no_kimi(model_id: str) -> str | None:
        return "not in this key's model allowlist" if model_id == "kimi-k2.5" else None

    chosen = Counter(
        plan_for(SEEDS_SPLIT, key=f"k{n}", usable=no_kimi).candidates[0].model for n in range(2000)
    )

    assert "kimi-k2.5" not in chosen
    assert sum(chosen.values()) == 2000


IMAGE = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
LONG = [{"role": "user", "content": "x" * 9000}]  # about 2,250 tokens

SEEDS_RULES = spec(
    "auto",
    Route.Strategy.RULES,
    model("Qwen/Qwen3-VL-32B", when_image=True),
    model("Qwen/Qwen3.5-397B", when_reasoning=True, min_prompt_tokens=2000),
    model("Qwen/Qwen3-8B", max_prompt_chars=200),
    model("Qwen/Qwen3-32B"),
)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            "Qwen/Qwen3-VL-32B",
        ),
        (
            {"messages": [{"role": "user", "content": "x" * 9000}], "enable_thinking": True},
            "Qwen/Qwen3.5-397B",
        ),
        (
            {"messages": [{"role": "user", "content": "x" * 9000}], "reasoning_effort": "high"},
            "Qwen/Qwen3.5-397B",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x" * 9000}],
                "metadata": {"reasoning": "on"},
            },
            "Qwen/Qwen3.5-397B",
        ),
        (
            {"messages": [{"role": "user", "content": "x" * 9000}], "enable_thinking": False},
            "Qwen/Qwen3-32B",
        ),
        (
            {"messages": [{"role": "user", "content": "short"}], "enable_thinking": True},
            "Qwen/Qwen3-8B",
        ),
        ({"messages": [{"role": "user", "content": "x" * 500}]}, "Qwen/Qwen3-32B"),
    ],
)
def test_rules_follow_the_seeds_router(body, expected):
    plan = plan_for(SEEDS_RULES, body)

    assert [c.model for c in plan.candidates] == [expected]
    assert any("matched" in step for step in plan.steps)


def test_a_matching_rule_without_a_usable_model_falls_to_the_next_rule():
    def no_vision(model_id: str) -> str | None:
        return "no price yet" if model_id == "Qwen/Qwen3-VL-32B" else None

    body = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
        ]
    }
    plan = plan_for(SEEDS_RULES, body, usable=no_vision)

    assert [c.model for c in plan.candidates] == ["Qwen/Qwen3-8B"]
    assert plan.skipped == [("Qwen/Qwen3-VL-32B", "no price yet")]


def test_strategies_compose_and_timeouts_come_from_the_nearest_target():
    flash_chain = spec(
        "flash-chain",
        Route.Strategy.FALLBACK,
        model("deepseek-v4-flash", timeout=10),
        model("Qwen/Qwen3-32B"),
    )
    tiers = spec(
        "tiers",
        Route.Strategy.SPLIT,
        sub("flash-chain", weight=1, timeout=20),
    )
    routes = {"flash-chain": flash_chain, "tiers": tiers}

    plan = plan_for(tiers, routes=routes)

    assert [(c.model, c.timeout) for c in plan.candidates] == [
        ("deepseek-v4-flash", 10),
        ("Qwen/Qwen3-32B", 20),
    ]
    assert plan.candidates[0].via == ("tiers", "flash-chain")


def test_a_model_reached_twice_is_tried_once():
    route = spec("dup", Route.Strategy.FALLBACK, model("a"), model("b"), model("a"))

    assert [c.model for c in plan_for(route).candidates] == ["a", "b"]


@pytest.mark.django_db
def test_validation_refuses_cycles_missing_targets_and_bad_weights():
    provider = Provider.objects.create(name="p", base_url="http://127.0.0.1:9/v1")
    m = model_create("m", provider=provider)
    outer = Route.objects.create(name="outer")
    inner = Route.objects.create(name="inner")
    RouteTarget.objects.create(route=outer, subroute=inner)

    with pytest.raises(ValidationError, match="cycle: inner -> outer -> inner"):
        route_targets_validate(inner, [TargetDraft(model=None, subroute=outer)])
    with pytest.raises(ValidationError, match="choose a model or a route"):
        route_targets_validate(inner, [TargetDraft(model=None, subroute=None)])
    with pytest.raises(ValidationError, match="weight must be a positive"):
        route_targets_validate(inner, [TargetDraft(model=m, subroute=None, weight=0)])
    with pytest.raises(ValidationError, match="at least one target"):
        route_targets_validate(inner, [])
    route_targets_validate(inner, [TargetDraft(model=m, subroute=None, weight=3)])
