"""The staff console for providers, the catalog and its prices.

A price is never edited: "adding" a price for a model opens a new version from its start
and closes the current one (routing.services.model_price_set).
"""

from __future__ import annotations

from datetime import timedelta

from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Prefetch
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from config.admin_base import ModelAdmin

from .models import (
    CAPABILITIES,
    MODALITIES,
    CatalogModel,
    CircuitBreaker,
    ModelPrice,
    Provider,
    Route,
    RouteTarget,
)
from .routes import TargetDraft, route_name_validate, route_targets_validate
from .services import (
    PriceChangeError,
    model_price_cancel,
    model_price_change_check,
    model_price_set,
    price_change_earliest,
    price_version_cancellable,
)

UNSET = "unset"


@admin.register(Provider)
class ProviderAdmin(ModelAdmin):
    list_display = ("name", "base_url", "api_key_env", "key_configured", "timeout_seconds")
    search_fields = ("name", "base_url")
    readonly_fields = ("created_at", "updated_at")
    # A URL typed without a scheme means https (Django 6's default, adopted now).
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}

    @admin.display(description="key in environment", boolean=True)
    def key_configured(self, provider: Provider) -> bool:
        return provider.api_key() is not None


class CatalogModelForm(forms.ModelForm):
    modalities = forms.MultipleChoiceField(
        choices=[(m, m) for m in MODALITIES], widget=forms.CheckboxSelectMultiple
    )
    capabilities = forms.MultipleChoiceField(
        choices=[(c, c) for c in CAPABILITIES],
        widget=forms.CheckboxSelectMultiple,
        required=False,
    )

    class Meta:
        model = CatalogModel
        fields = (
            "public_id",
            "display_name",
            "family",
            "developer",
            "provider",
            "upstream_model_id",
            "context_window",
            "max_output_tokens",
            "modalities",
            "capabilities",
            "enabled",
        )


class ModelPriceInline(admin.TabularInline):
    model = ModelPrice
    fields = ("effective_from", "effective_to", "input", "cached_input", "output")
    readonly_fields = fields
    extra = 0
    can_delete = False
    verbose_name_plural = "Price history (USD per 1M tokens)"

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="input")
    def input(self, price: ModelPrice):
        return _price(price.input_per_mtok)

    @admin.display(description="cached input")
    def cached_input(self, price: ModelPrice):
        if price.cached_input_per_mtok is None and price.input_per_mtok is not None:
            return "= input"
        return _price(price.cached_input_per_mtok)

    @admin.display(description="output")
    def output(self, price: ModelPrice):
        return _price(price.output_per_mtok)


def _price(value) -> str:
    return UNSET if value is None else f"${value.normalize():f}"


@admin.register(CatalogModel)
class CatalogModelAdmin(ModelAdmin):
    form = CatalogModelForm
    list_display = (
        "public_id",
        "display_name",
        "family",
        "developer",
        "provider",
        "input_price",
        "output_price",
        "enabled",
    )
    list_filter = ("family", "provider", "enabled")
    search_fields = ("public_id", "display_name", "upstream_model_id")
    list_select_related = ("provider",)
    readonly_fields = ("created_at", "set_price")
    inlines = [ModelPriceInline]

    def get_queryset(self, request):
        open_prices = ModelPrice.objects.filter(effective_to__isnull=True)
        return (
            super()
            .get_queryset(request)
            .prefetch_related(Prefetch("prices", queryset=open_prices, to_attr="open_prices"))
        )

    def _open_price(self, model: CatalogModel) -> ModelPrice | None:
        prices = getattr(model, "open_prices", None)
        if prices is None:
            prices = list(model.prices.filter(effective_to__isnull=True))
        return prices[0] if prices else None

    @admin.display(description="input $/1M")
    def input_price(self, model: CatalogModel) -> str:
        price = self._open_price(model)
        return _price(price.input_per_mtok if price else None)

    @admin.display(description="output $/1M")
    def output_price(self, model: CatalogModel) -> str:
        price = self._open_price(model)
        if price is None or price.output_per_mtok is None:
            return "unset (refuses calls)"
        return _price(price.output_per_mtok)

    @admin.display(description="change price")
    def set_price(self, model: CatalogModel) -> str:
        if model.pk is None:
            return "Save the model first."
        url = reverse("admin:routing_modelprice_add") + f"?model={model.pk}"
        return format_html('<a class="button" href="{}">Set a new price…</a>', url)


def _price_not_negative(value) -> None:
    if value is not None and value < 0:
        raise ValidationError("A price is not negative: USD per 1M tokens, 0 or more.")


class PriceVersionForm(forms.ModelForm):
    """A form over a price version's input, cached input and output prices (a list price,
    or a tenant's own): a negative one is refused on its field, in words, rather than by
    the database constraint's name or a failed save."""

    PRICE_FIELDS = ("input_per_mtok", "cached_input_per_mtok", "output_per_mtok")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in self.PRICE_FIELDS:
            if name not in self.fields:
                continue  # a stored version's page: read-only, no form fields
            self.fields[name].validators.append(_price_not_negative)
            self.fields[name].widget.attrs["min"] = 0


class ModelPriceForm(PriceVersionForm):
    class Meta:
        model = ModelPrice
        fields = (
            "model",
            "input_per_mtok",
            "cached_input_per_mtok",
            "output_per_mtok",
            "effective_from",
        )
        help_texts = {
            "effective_from": "The new price applies from this instant; the current one ends "
            "there. Leave input prices empty rather than guessing: unset is not zero."
        }

    def clean(self):
        data = super().clean()
        if data.get("model") and data.get("effective_from"):
            try:
                model_price_change_check(model=data["model"], effective_from=data["effective_from"])
            except PriceChangeError as exc:
                self.add_error("effective_from", str(exc))
        return data


class PriceVersionAdmin(ModelAdmin):
    """Price versions (list or tenant): added, never edited; a scheduled one may be
    withdrawn, one at a time, before any process prices with it (`withdraw`, through
    routing.services.price_version_cancel); history may not."""

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return (
            obj is not None
            and price_version_cancellable(obj)
            and super().has_delete_permission(request, obj)
        )

    def get_actions(self, request):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions

    def delete_model(self, request, obj) -> None:
        self.withdraw(obj)

    def withdraw(self, price) -> None:
        raise NotImplementedError

    def get_changeform_initial_data(self, request):
        initial = super().get_changeform_initial_data(request)
        # A minute of slack over the earliest allowed start, for filling in the form.
        start = price_change_earliest() + timedelta(minutes=1)
        initial.setdefault("effective_from", start.replace(second=0) + timedelta(minutes=1))
        return initial


@admin.register(ModelPrice)
class ModelPriceAdmin(PriceVersionAdmin):
    form = ModelPriceForm
    list_display = ("model", "effective_from", "effective_to", "input", "cached", "output")
    list_filter = ("model__family", "model")
    list_select_related = ("model",)
    date_hierarchy = "effective_from"

    def withdraw(self, price: ModelPrice) -> None:
        model_price_cancel(price)

    @admin.display(description="input $/1M")
    def input(self, price: ModelPrice) -> str:
        return _price(price.input_per_mtok)

    @admin.display(description="cached $/1M")
    def cached(self, price: ModelPrice) -> str:
        if price.cached_input_per_mtok is None and price.input_per_mtok is not None:
            return "= input"
        return _price(price.cached_input_per_mtok)

    @admin.display(description="output $/1M")
    def output(self, price: ModelPrice) -> str:
        return _price(price.output_per_mtok)

    def save_model(self, request, obj, form, change):
        data = form.cleaned_data
        created = model_price_set(
            model=data["model"],
            input_per_mtok=data["input_per_mtok"],
            cached_input_per_mtok=data["cached_input_per_mtok"],
            output_per_mtok=data["output_per_mtok"],
            effective_from=data["effective_from"],
        )
        obj.pk = created.pk


# --- Routes and breakers ---------------------------------------------------------------


class RouteForm(forms.ModelForm):
    class Meta:
        model = Route
        fields = ("name", "description", "strategy", "enabled")

    def clean_name(self) -> str:
        name = self.cleaned_data["name"]
        try:
            route_name_validate(name)
        except ValidationError as exc:
            raise ValidationError(exc.message_dict["name"]) from None
        return name


class RouteTargetFormSet(forms.BaseInlineFormSet):
    """Validates the targets together: each names one model or route, weights and
    timeouts are positive, and the route does not reach itself."""

    def clean(self) -> None:
        super().clean()
        if any(self.errors):
            return
        drafts = []
        for form in self.forms:
            data = getattr(form, "cleaned_data", None)
            if not data or data.get("DELETE"):
                continue
            drafts.append(
                TargetDraft(
                    model=data.get("model"),
                    subroute=data.get("subroute"),
                    weight=data.get("weight"),
                    timeout_seconds=data.get("timeout_seconds"),
                )
            )
        route_targets_validate(self.instance, drafts)


class RouteTargetInline(admin.TabularInline):
    model = RouteTarget
    formset = RouteTargetFormSet
    fk_name = "route"
    extra = 1
    fields = (
        "position",
        "model",
        "subroute",
        "timeout_seconds",
        "weight",
        "when_image",
        "when_reasoning",
        "min_prompt_tokens",
        "max_prompt_chars",
    )
    autocomplete_fields = ("model",)
    verbose_name_plural = (
        "Targets, in order (fallback: timeout per attempt; split: weight; rules: conditions, "
        "all of which must hold, none for the default)"
    )


@admin.register(Route)
class RouteAdmin(ModelAdmin):
    form = RouteForm
    inlines = [RouteTargetInline]
    list_display = ("name", "strategy", "enabled", "targets_summary", "updated_at")
    list_filter = ("strategy", "enabled")
    search_fields = ("name", "description")
    readonly_fields = ("created_at", "updated_at")

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .prefetch_related(
                Prefetch(
                    "targets",
                    queryset=RouteTarget.objects.select_related("model", "subroute"),
                )
            )
        )

    @admin.display(description="targets")
    def targets_summary(self, route: Route) -> str:
        parts = []
        for target in route.targets.all():
            label = target.target_name
            if route.strategy == Route.Strategy.SPLIT:
                label += f" (weight {target.weight})"
            elif route.strategy == Route.Strategy.FALLBACK and target.timeout_seconds:
                label += f" ({target.timeout_seconds:g} s)"
            elif route.strategy == Route.Strategy.RULES:
                label += f" if {' and '.join(target.conditions)}" if target.conditions else ""
            parts.append(label)
        return " → ".join(parts) if route.strategy == Route.Strategy.FALLBACK else "; ".join(parts)


@admin.register(CircuitBreaker)
class CircuitBreakerAdmin(ModelAdmin):
    list_display = (
        "model",
        "state",
        "consecutive_failures",
        "open_until",
        "times_opened",
        "last_failure_at",
        "last_error",
    )
    list_select_related = ("model",)
    readonly_fields = (*list_display, "probe_until", "changed_at")
    fields = readonly_fields
    actions = ["close_breakers"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.display(description="state")
    def state(self, breaker: CircuitBreaker) -> str:
        return breaker.state(timezone.now())

    @admin.action(
        description="Close the selected breakers (the next call goes through)",
        permissions=["change"],
    )
    def close_breakers(self, request, queryset) -> None:
        breakers = list(queryset)
        closed = queryset.update(consecutive_failures=0, open_until=None, probe_until=None)
        for breaker in breakers:
            self.log_change(request, breaker, "Closed by hand.")
        self.message_user(request, f"Closed {closed} breaker(s).")
