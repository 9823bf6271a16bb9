"""The model catalog, its versioned prices, and the upstream providers that serve it."""

from __future__ import annotations

import os
import re
from decimal import Decimal
from urllib.parse import SplitResult, urlsplit

from django import forms
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import models
from django.db.models import Q

_ENV_VAR_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


# The messages of both checks never repeat the value: it may hold a key pasted by mistake.
def validate_env_var_name(value: str) -> None:
    if not _ENV_VAR_NAME.fullmatch(value):
        raise ValidationError(
            "Name the environment variable that holds the key (capitals, digits and _, "
            "e.g. DEEPSEEK_API_KEY), not the key itself: a key typed here would be stored "
            "and shown in clear."
        )


# The longest an upstream call may be given, in seconds: an hour is far beyond any chat
# completion, and the socket layer refuses values past about 9.2e9 s.
MAX_TIMEOUT_SECONDS = 3600.0


def validate_timeout(value: float) -> None:
    if not 0 < value <= MAX_TIMEOUT_SECONDS:  # NaN fails too
        raise ValidationError(
            f"A timeout is more than 0 and at most {MAX_TIMEOUT_SECONDS:g} seconds."
        )


# One DNS label: a compose service or a Kubernetes service in the same namespace.
_SINGLE_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE)


class ServiceURLValidator(URLValidator):
    """Django's URLValidator, also taking a host that is one label (`http://vllm:8000/v1`,
    a compose or Kubernetes service name), which it refuses for want of a dot."""

    def __call__(self, value):
        try:
            super().__call__(value)
        except ValidationError:
            # urlsplit drops tabs and line breaks, which the value stored would keep.
            dotted = None if self.unsafe_chars.intersection(value) else _single_label_dotted(value)
            if dotted is None:
                raise
            super().__call__(dotted)


def _single_label_dotted(value: str) -> str | None:
    """`value` with its one-label host given a domain, to be checked as any URL; None for
    any other URL."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return None
    userinfo, at, hostport = parts.netloc.rpartition("@")
    host, colon, port = hostport.partition(":")
    if not _SINGLE_LABEL.fullmatch(host) or host.isdigit():
        return None
    return parts._replace(netloc=f"{userinfo}{at}{host}.internal{colon}{port}").geturl()


class ServiceURLFormField(forms.URLField):
    default_validators = [ServiceURLValidator()]


class ServiceURLField(models.URLField):
    """A URLField whose host may be a single label (ServiceURLValidator), in the admin's
    forms too."""

    default_validators = [ServiceURLValidator()]

    def formfield(self, **kwargs):
        return super().formfield(**{"form_class": ServiceURLFormField, **kwargs})


def http_url_parts(value: str, what: str) -> SplitResult | None:
    """The parts of an http or https URL; ValidationError naming `what` for another
    scheme; None where URLField's own check will say it is no URL at all."""
    if "://" not in value:
        return None
    try:
        parts = urlsplit(value)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValidationError(f"{what} starts with http:// or https://, not {parts.scheme}://.")
    return parts


def validate_provider_url(value: str) -> None:
    """http or https, with no user:password, query or fragment in it (URLField's own check
    lets ftp and credentials through)."""
    parts = http_url_parts(value, "A provider's base URL")
    if parts is None:
        return
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        # A query could carry a key (?api_key=...), and the SDK appends its paths after
        # it, so no call would work either.
        raise ValidationError(
            "Leave credentials, a query (?...) and a fragment (#...) out of the base URL: "
            "put the provider's key in an environment variable and name that variable "
            "instead."
        )


class Provider(models.Model):
    """An OpenAI-compatible upstream. Its secret lives in the environment, never here."""

    name = models.SlugField(max_length=64, unique=True)
    base_url = ServiceURLField(
        max_length=500,
        validators=[validate_provider_url],
        help_text="OpenAI-compatible base URL (http or https, no credentials), ending in /v1.",
    )
    api_key_env = models.CharField(
        "API key environment variable",
        max_length=100,
        blank=True,
        validators=[validate_env_var_name],
        help_text="Name of the environment variable that holds this provider's API key "
        "(e.g. DEEPSEEK_API_KEY), never the key itself. Leave empty for a provider that "
        "needs none (the mock upstream).",
    )
    timeout_seconds = models.FloatField(
        default=60.0,
        validators=[validate_timeout],
        help_text="Connect and read timeout for one upstream call, in seconds.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(timeout_seconds__gt=0), name="provider_timeout_positive"
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def api_key(self) -> str | None:
        """The key read from the environment, without the line end a mounted secret file
        often leaves (which no header may carry); None when the variable is named but
        unset or blank."""
        if not self.api_key_env:
            return "not-needed"
        return os.environ.get(self.api_key_env, "").strip() or None


MODALITIES = ("text", "image", "audio", "video")
CAPABILITIES = ("reasoning", "code", "vision")


def _validate_subset(allowed: tuple[str, ...]):
    def validate(value: object) -> None:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValidationError("Expected a list of names.")
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise ValidationError(f"Unknown: {', '.join(unknown)}. Allowed: {', '.join(allowed)}.")

    return validate


def validate_modalities(value: object) -> None:
    _validate_subset(MODALITIES)(value)


def validate_capabilities(value: object) -> None:
    _validate_subset(CAPABILITIES)(value)


def default_modalities() -> list[str]:
    return ["text"]


class CatalogModel(models.Model):
    """A model a tenant may be allowed to call, under its public id."""

    public_id = models.CharField(
        max_length=200, unique=True, help_text="The id clients send, e.g. deepseek-v4-flash."
    )
    display_name = models.CharField(max_length=200)
    family = models.CharField(max_length=64, help_text="DeepSeek, Qwen, Kimi, GLM, ...")
    developer = models.CharField(max_length=128)
    provider = models.ForeignKey(Provider, on_delete=models.PROTECT, related_name="models")
    upstream_model_id = models.CharField(
        max_length=200, help_text="The id the provider expects in the request body."
    )
    context_window = models.PositiveIntegerField(default=128_000)
    max_output_tokens = models.PositiveIntegerField(
        default=8192,
        help_text="Output cap of one call. Bounds a call's worst-case cost for budgets when the "
        "client sends no max_tokens (the gateway then sends this one).",
    )
    modalities = models.JSONField(default=default_modalities, validators=[validate_modalities])
    capabilities = models.JSONField(default=list, blank=True, validators=[validate_capabilities])
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["family", "public_id"]

    def __str__(self) -> str:
        return self.public_id

    def clean(self) -> None:
        # Clients call routes and models by one name; a model named like a route would
        # silently take its calls (routes' own check is route_name_validate).
        if self.public_id and Route.objects.filter(name=self.public_id).exists():
            raise ValidationError(
                {
                    "public_id": f"'{self.public_id}' is the name of a route; a model needs an "
                    "id of its own."
                }
            )


class ModelPrice(models.Model):
    """One version of a model's list price, USD per 1M tokens, in force over [from, to).

    A price change closes the current row and opens a new one (see
    `routing.services.model_price_set`); rows that usage events refer to are never edited.
    An unset input price is unset, not zero: the system check flags it.
    """

    model = models.ForeignKey(CatalogModel, on_delete=models.PROTECT, related_name="prices")
    input_per_mtok = models.DecimalField(
        "input $/1M", max_digits=14, decimal_places=6, null=True, blank=True
    )
    cached_input_per_mtok = models.DecimalField(
        "cached input $/1M",
        max_digits=14,
        decimal_places=6,
        null=True,
        blank=True,
        help_text="Unset: cached input tokens are billed at the input price.",
    )
    output_per_mtok = models.DecimalField(
        "output $/1M", max_digits=14, decimal_places=6, null=True, blank=True
    )
    effective_from = models.DateTimeField()
    effective_to = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["model_id", "-effective_from"]
        constraints = [
            models.UniqueConstraint(
                fields=["model"],
                condition=Q(effective_to__isnull=True),
                name="model_price_one_open_version",
            ),
            models.UniqueConstraint(
                fields=["model", "effective_from"], name="model_price_unique_start"
            ),
            models.CheckConstraint(
                condition=Q(effective_to__isnull=True)
                | Q(effective_to__gt=models.F("effective_from")),
                name="model_price_interval_forward",
            ),
            models.CheckConstraint(
                condition=(Q(input_per_mtok__isnull=True) | Q(input_per_mtok__gte=0))
                & (Q(cached_input_per_mtok__isnull=True) | Q(cached_input_per_mtok__gte=0))
                & (Q(output_per_mtok__isnull=True) | Q(output_per_mtok__gte=0)),
                name="model_price_not_negative",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model.public_id} from {self.effective_from:%Y-%m-%d %H:%M}"

    @property
    def cached_input_effective(self) -> Decimal | None:
        """The price cached input is billed at: its own, else the input price."""
        if self.cached_input_per_mtok is not None:
            return self.cached_input_per_mtok
        return self.input_per_mtok


ROUTE_NAME_HELP = (
    "The name clients send as `model`, e.g. auto, tier-1, support-default. Letters, digits "
    "and . _ - : only; not the id of a catalog model."
)


class Route(models.Model):
    """A name a key calls like a model, resolved per request to catalog models.

    An alias is the simplest route: a fallback chain of one model. Routes compose: a target
    is a catalog model or another route (never the route itself, directly or not).
    """

    class Strategy(models.TextChoices):
        FALLBACK = "fallback", "Fallback chain: targets in order, the next after a failure"
        RULES = "rules", "Rules: the first target whose conditions match the request"
        SPLIT = "split", "Weighted split: one target by weight, fixed per request id"

    name = models.CharField(max_length=200, unique=True, help_text=ROUTE_NAME_HELP)
    description = models.CharField(max_length=500, blank=True)
    strategy = models.CharField(max_length=16, choices=Strategy.choices, default=Strategy.FALLBACK)
    enabled = models.BooleanField(
        default=True, help_text="A disabled route is not listed and cannot be called."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


# What a refused target is told, in words: on its row in the admin (the constraints'
# messages, which Django's model validation gives) and, numbered, by
# `routing.routes.route_targets_validate` (the management API, the admin's formset).
TARGET_MODEL_OR_ROUTE = "Choose a model or a route, not both or neither."
TARGET_WEIGHT_POSITIVE = "The weight must be a positive whole number."
TARGET_TIMEOUT_BOUNDS = (
    f"The timeout must be more than 0 and at most {MAX_TIMEOUT_SECONDS:g} seconds."
)
TARGET_NOT_ITSELF = "A route cannot be its own target."


class RouteTarget(models.Model):
    """One target of a route: a catalog model or another route, in order.

    Fallback chains use `timeout_seconds` (per attempt), splits use `weight`, rules use
    the conditions: every condition set must hold; a target with none always matches.
    """

    route = models.ForeignKey(Route, on_delete=models.CASCADE, related_name="targets")
    position = models.PositiveSmallIntegerField(default=0)
    model = models.ForeignKey(
        CatalogModel,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="route_targets",
    )
    subroute = models.ForeignKey(
        Route,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="used_by",
        verbose_name="route",
        help_text="Another route, instead of a model.",
    )
    timeout_seconds = models.FloatField(
        null=True,
        blank=True,
        validators=[validate_timeout],
        help_text="Per attempt, e.g. 10. Empty: the provider's timeout (or the enclosing "
        "target's).",
    )
    weight = models.PositiveIntegerField(default=1, help_text="Weighted splits: its share.")
    when_image = models.BooleanField(
        "has an image", default=False, help_text="Rules: the request carries image content."
    )
    when_reasoning = models.BooleanField(
        "asks for reasoning",
        default=False,
        help_text="Rules: the body or its metadata asks for reasoning (enable_thinking, "
        "reasoning_effort, thinking, reasoning, metadata.reasoning).",
    )
    min_prompt_tokens = models.PositiveIntegerField(
        null=True, blank=True, help_text="Rules: the prompt has at least this many tokens."
    )
    max_prompt_chars = models.PositiveIntegerField(
        null=True, blank=True, help_text="Rules: the prompt is shorter than this many characters."
    )

    class Meta:
        ordering = ["route_id", "position", "id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(model__isnull=False, subroute__isnull=True)
                | Q(model__isnull=True, subroute__isnull=False),
                name="route_target_model_or_route",
                violation_error_message=TARGET_MODEL_OR_ROUTE,
            ),
            models.CheckConstraint(
                condition=Q(weight__gt=0),
                name="route_target_weight_positive",
                violation_error_message=TARGET_WEIGHT_POSITIVE,
            ),
            models.CheckConstraint(
                condition=Q(timeout_seconds__isnull=True) | Q(timeout_seconds__gt=0),
                name="route_target_timeout_positive",
                violation_error_message=TARGET_TIMEOUT_BOUNDS,
            ),
            models.CheckConstraint(
                condition=~Q(subroute=models.F("route")),
                name="route_target_not_itself",
                violation_error_message=TARGET_NOT_ITSELF,
            ),
        ]

    def __str__(self) -> str:
        return f"{self.route.name} #{self.position}: {self.target_name}"

    @property
    def target_name(self) -> str:
        if self.model_id:
            return self.model.public_id
        return self.subroute.name if self.subroute_id else "?"

    @property
    def conditions(self) -> list[str]:
        out = []
        if self.when_image:
            out.append("has an image")
        if self.when_reasoning:
            out.append("asks for reasoning")
        if self.min_prompt_tokens is not None:
            out.append(f"prompt >= {self.min_prompt_tokens} tokens")
        if self.max_prompt_chars is not None:
            out.append(f"prompt < {self.max_prompt_chars} characters")
        return out


class CircuitBreaker(models.Model):
    """The breaker of one catalog model, shared by every gateway process.

    Closed: calls go through; each routed failure (timeout, connection error, 429, 5xx)
    adds one to `consecutive_failures`, a success resets it. At
    TOLLGATE_BREAKER_FAILURES it opens until `open_until`: routes skip the model. After
    that, one request claims the half-open probe (`probe_until`); its success closes the
    breaker, its failure opens it again for another cooldown.
    """

    model = models.OneToOneField(
        CatalogModel, on_delete=models.CASCADE, primary_key=True, related_name="breaker"
    )
    consecutive_failures = models.PositiveIntegerField(default=0)
    open_until = models.DateTimeField(null=True, blank=True)
    probe_until = models.DateTimeField(null=True, blank=True)
    times_opened = models.PositiveIntegerField(default=0)
    last_failure_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=200, blank=True)
    changed_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model_id"]

    def __str__(self) -> str:
        return f"breaker of {self.model_id}"

    def state(self, now) -> str:
        if self.open_until is None:
            return "closed"
        if self.open_until > now:
            return "open"
        return "half-open"
