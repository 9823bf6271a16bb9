"""Routes: names a key calls like models, resolved per request to an ordered list of
catalog models to try.

A route's strategy picks among its targets; a target is a catalog model or another
route, so strategies compose (a split whose tiers are fallback chains, rules whose
default is an alias, ...):

- fallback: every target in order; the proxy tries the next after a timeout, a
  connection error, a 429 or a 5xx (never after another 4xx);
- rules: the first target whose conditions all hold for the request (image content,
  a reasoning flag, a long or a short prompt; a target without conditions always holds);
- split: one target by weight, from a hash of the request's split key, so the same key
  always lands on the same target.

A target the key may not use (allowlist, no price, breaker open) is skipped and the
plan says why; the proxy then skips those whose worst-case cost does not fit the budget.
`route_plan` only reads: the explain endpoint runs it as a dry run.

The request path reads routes from a per-process snapshot, like the catalog (see
`routing.selectors`): saving a route clears it in the saving process, the others reload
within TOLLGATE_CONFIG_CACHE_SECONDS.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from django.core.exceptions import ValidationError

from .config_cache import ConfigCache
from .models import (
    MAX_TIMEOUT_SECONDS,
    TARGET_MODEL_OR_ROUTE,
    TARGET_NOT_ITSELF,
    TARGET_TIMEOUT_BOUNDS,
    TARGET_WEIGHT_POSITIVE,
    CatalogModel,
    Route,
    RouteTarget,
)

ROUTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")
IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image"})
_OFF = frozenset({"", "0", "false", "no", "off", "none", "disabled"})


# --- What a rule looks at ---------------------------------------------------------------


@dataclass(frozen=True)
class RequestFeatures:
    has_image: bool
    wants_reasoning: bool
    prompt_chars: int  # characters of the messages' text
    prompt_tokens: int  # estimated: about four characters a token

    def describe(self) -> str:
        return (
            f"image: {'yes' if self.has_image else 'no'}, reasoning asked: "
            f"{'yes' if self.wants_reasoning else 'no'}, prompt: {self.prompt_chars} "
            f"characters, about {self.prompt_tokens} tokens"
        )


def _on(value: object) -> bool:
    """Whether a reasoning flag is set: true, "high", {"type": "enabled"}, ... One level of
    object only, so that no nesting a client sends can make this recurse."""
    if isinstance(value, dict):
        return all(_flat_on(value.get(name, True)) for name in ("type", "effort", "enabled"))
    return _flat_on(value)


def _flat_on(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in _OFF
    return bool(value)


def request_features(body: Mapping) -> RequestFeatures:
    """The facts rules test, from a validated chat completion body."""
    has_image = False
    texts: list[str] = []
    for message in body.get("messages") or ():
        if not isinstance(message, Mapping):
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, Mapping):
                    continue
                kind = part.get("type")
                if isinstance(kind, str) and kind in IMAGE_PART_TYPES:
                    has_image = True
                text = part.get("text")
                if isinstance(text, str):
                    texts.append(text)
    metadata = body.get("metadata")
    flags = [body.get(name) for name in ("enable_thinking", "reasoning_effort", "thinking")]
    flags.append(body.get("reasoning"))
    if isinstance(metadata, Mapping):
        flags.append(metadata.get("reasoning"))
    wants_reasoning = any(flag is not None and _on(flag) for flag in flags)
    chars = sum(len(t) for t in texts)
    return RequestFeatures(
        has_image=has_image,
        wants_reasoning=wants_reasoning,
        prompt_chars=chars,
        prompt_tokens=(chars + 3) // 4,
    )


# --- The snapshot -----------------------------------------------------------------------


@dataclass(frozen=True)
class TargetSpec:
    model: str | None  # catalog public id
    route: str | None  # another route's name
    timeout: float | None
    weight: int
    when_image: bool = False
    when_reasoning: bool = False
    min_prompt_tokens: int | None = None
    max_prompt_chars: int | None = None

    @property
    def name(self) -> str:
        return self.model or self.route or "?"

    def matches(self, features: RequestFeatures) -> tuple[bool, str]:
        """(all conditions hold, why), for rules."""
        checks = []
        if self.when_image:
            checks.append((features.has_image, "has an image"))
        if self.when_reasoning:
            checks.append((features.wants_reasoning, "asks for reasoning"))
        if self.min_prompt_tokens is not None:
            checks.append(
                (
                    features.prompt_tokens >= self.min_prompt_tokens,
                    f"prompt >= {self.min_prompt_tokens} tokens",
                )
            )
        if self.max_prompt_chars is not None:
            checks.append(
                (
                    features.prompt_chars < self.max_prompt_chars,
                    f"prompt < {self.max_prompt_chars} characters",
                )
            )
        if not checks:
            return True, "no conditions (the default)"
        failed = [what for ok, what in checks if not ok]
        if failed:
            return False, "not: " + ", ".join(failed)
        return True, ", ".join(what for _, what in checks)


@dataclass(frozen=True)
class RouteSpec:
    name: str
    strategy: str
    targets: tuple[TargetSpec, ...]
    created: int  # unix seconds, for /v1/models


_routes = ConfigCache(maxsize=1)


def _routes_load() -> dict[str, RouteSpec]:
    targets: dict[int, list[TargetSpec]] = {}
    rows = RouteTarget.objects.select_related("model", "subroute").order_by(
        "route_id", "position", "id"
    )
    for t in rows:
        targets.setdefault(t.route_id, []).append(
            TargetSpec(
                model=t.model.public_id if t.model_id else None,
                route=t.subroute.name if t.subroute_id else None,
                timeout=t.timeout_seconds,
                weight=t.weight,
                when_image=t.when_image,
                when_reasoning=t.when_reasoning,
                min_prompt_tokens=t.min_prompt_tokens,
                max_prompt_chars=t.max_prompt_chars,
            )
        )
    return {
        r.name: RouteSpec(
            name=r.name,
            strategy=r.strategy,
            targets=tuple(targets.get(r.pk, ())),
            created=int(r.created_at.timestamp()),
        )
        for r in Route.objects.filter(enabled=True)
    }


def routes_all(*, fresh: bool = False) -> dict[str, RouteSpec]:
    """Every enabled route by name, from the process snapshot (`fresh`: from the
    database, for the admin's and the API's reads)."""
    if fresh:
        return _routes_load()
    return _routes.get_or_load("routes", _routes_load)


def routes_cache_clear(**kwargs) -> None:
    """Drop this process's route snapshot (connected to the route models' signals)."""
    _routes.clear()


def route_models(spec: RouteSpec, routes: Mapping[str, RouteSpec] | None = None) -> set[str]:
    """Every catalog id a route can reach, through its subroutes."""
    routes = routes if routes is not None else routes_all()
    found: set[str] = set()
    seen: set[str] = set()

    def walk(s: RouteSpec) -> None:
        if s.name in seen:
            return
        seen.add(s.name)
        for t in s.targets:
            if t.model:
                found.add(t.model)
            elif t.route and t.route in routes:
                walk(routes[t.route])

    walk(spec)
    return found


# --- The plan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One catalog model to try, with the timeout of its attempt (None: the provider's)."""

    model: str
    timeout: float | None
    via: tuple[str, ...]  # the routes that led here, outermost first


@dataclass
class Plan:
    route: str
    candidates: list[Candidate] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)  # why, in the order decided
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (model, reason)

    def skip(self, model: str, reason: str) -> None:
        if all(m != model for m, _ in self.skipped):
            self.skipped.append((model, reason))


def split_point(split_key: str, route: str) -> float:
    """A number in [0, 1) fixed by the split key and the route, uniform over keys."""
    digest = hashlib.sha256(f"{route}\x00{split_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_pick(targets: Iterable[TargetSpec], point: float) -> TargetSpec:
    """The target whose share of the total weight holds `point`."""
    targets = list(targets)
    total = sum(t.weight for t in targets)
    mark = point * total
    running = 0
    for target in targets:
        running += target.weight
        if mark < running:
            return target
    return targets[-1]


def route_plan(
    spec: RouteSpec,
    *,
    features: RequestFeatures,
    split_key: str,
    usable: Callable[[str], str | None],
    routes: Mapping[str, RouteSpec] | None = None,
) -> Plan:
    """The models to try for a request to a route, in order, and why.

    `usable(model id)` answers None when the key may call the model now, else the reason
    it may not; such models are skipped (a rule or a split then looks further).
    """
    routes = routes if routes is not None else routes_all()
    plan = Plan(route=spec.name)
    seen: set[str] = set()

    def expand(s: RouteSpec, via: tuple[str, ...], timeout: float | None) -> list[Candidate]:
        via = (*via, s.name)
        if s.strategy == Route.Strategy.RULES:
            for index, target in enumerate(s.targets, 1):
                ok, why = target.matches(features)
                if not ok:
                    plan.steps.append(f"{s.name}: rule {index} ({target.name}) {why}")
                    continue
                found = target_expand(target, via, timeout)
                if found:
                    plan.steps.append(f"{s.name}: rule {index} matched ({why}) -> {target.name}")
                    return found
                plan.steps.append(
                    f"{s.name}: rule {index} matched ({why}) but {target.name} has no usable "
                    "model; trying the next rule"
                )
            plan.steps.append(f"{s.name}: no rule matched with a usable model")
            return []
        if s.strategy == Route.Strategy.SPLIT:
            point = split_point(split_key, s.name)
            left = list(s.targets)
            while left:
                target = split_pick(left, point)
                total = sum(t.weight for t in left)
                found = target_expand(target, via, timeout)
                if found:
                    plan.steps.append(
                        f"{s.name}: split point {point:.4f} -> {target.name} "
                        f"(weight {target.weight} of {total})"
                    )
                    return found
                plan.steps.append(
                    f"{s.name}: split point {point:.4f} -> {target.name}, which has no usable "
                    "model; splitting among the rest"
                )
                left.remove(target)
            return []
        out: list[Candidate] = []
        for target in s.targets:
            out.extend(target_expand(target, via, timeout))
        if out:
            plan.steps.append(f"{s.name}: fallback chain " + " -> ".join(c.model for c in out))
        return out

    def target_expand(
        target: TargetSpec, via: tuple[str, ...], timeout: float | None
    ) -> list[Candidate]:
        timeout = target.timeout if target.timeout is not None else timeout
        if target.route is not None:
            sub = routes.get(target.route)
            if sub is None:
                plan.steps.append(f"{via[-1]}: route {target.route} is disabled")
                return []
            if sub.name in via:  # validation refuses cycles; never loop on a stale one
                return []
            return expand(sub, via, timeout)
        model = target.model
        if model in seen:
            return []
        reason = usable(model)
        if reason is not None:
            plan.skip(model, reason)
            return []
        seen.add(model)
        return [Candidate(model=model, timeout=timeout, via=via)]

    plan.candidates = expand(spec, (), None)
    return plan


# --- Validation (admin and API) ---------------------------------------------------------


@dataclass
class TargetDraft:
    """A target as a form or the API submits it, before it is saved."""

    model: CatalogModel | None
    subroute: Route | None
    weight: int = 1
    timeout_seconds: float | None = None


def route_name_validate(name: str) -> None:
    """A route's name: its characters, and not the id of a catalog model."""
    if not ROUTE_NAME.match(name or ""):
        raise ValidationError(
            {"name": "Use letters, digits and . _ - : only, starting with a letter or digit."}
        )
    if CatalogModel.objects.filter(public_id=name).exists():
        raise ValidationError(
            {"name": f"'{name}' is the id of a catalog model; a route needs a name of its own."}
        )


def route_targets_validate(route: Route, targets: list[TargetDraft]) -> None:
    """Each target names exactly one model or route, weights are positive, timeouts too,
    and no route reaches itself through its targets. Raises ValidationError."""
    errors = []
    if not targets:
        errors.append("A route needs at least one target.")
    for index, t in enumerate(targets, 1):
        if (t.model is None) == (t.subroute is None):
            errors.append(_numbered(index, TARGET_MODEL_OR_ROUTE))
        if t.weight is None or t.weight <= 0:
            errors.append(_numbered(index, TARGET_WEIGHT_POSITIVE))
        if t.timeout_seconds is not None and not 0 < t.timeout_seconds <= MAX_TIMEOUT_SECONDS:
            errors.append(_numbered(index, TARGET_TIMEOUT_BOUNDS))
        if t.subroute is not None and route.pk is not None and t.subroute.pk == route.pk:
            errors.append(_numbered(index, TARGET_NOT_ITSELF))
    if errors:
        raise ValidationError(errors)
    if route.pk is None:
        return  # a new route: nothing can point at it yet, so no cycle through it
    # Edges as saved, with this route's replaced by the drafts.
    edges: dict[int, set[int]] = {}
    for route_id, sub_id in RouteTarget.objects.filter(subroute__isnull=False).values_list(
        "route_id", "subroute_id"
    ):
        edges.setdefault(route_id, set()).add(sub_id)
    edges[route.pk] = {t.subroute.pk for t in targets if t.subroute is not None}
    names = dict(Route.objects.values_list("pk", "name"))
    path = _cycle_from(route.pk, edges)
    if path:
        raise ValidationError(
            "These targets make a cycle: "
            + " -> ".join(names.get(p, "?") for p in path)
            + f" -> {names.get(route.pk, '?')}."
        )


def _numbered(index: int, message: str) -> str:
    """A target's refusal as the API says it, "Target 2: choose a model ...": the words
    its constraint gives on the row itself in the admin."""
    return f"Target {index}: {message[0].lower()}{message[1:]}"


def _cycle_from(start: int, edges: dict[int, set[int]]) -> list[int] | None:
    """A path from `start` back to itself, if one exists."""
    stack: list[tuple[int, list[int]]] = [(start, [start])]
    visited: set[int] = set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(edges.get(node, ())):
            if nxt == start:
                return path
            if nxt not in visited:
                visited.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None
