"""The usage ledger in the staff console: read-only, filterable by tenant, model and day."""

from __future__ import annotations

from datetime import timedelta

from django import forms
from django.contrib import admin

from routing.services import PriceChangeError, price_change_earliest, price_start_check

from .models import TenantPrice, UsageEvent
from .pricing import tenant_price_set


@admin.register(UsageEvent)
class UsageEventAdmin(admin.ModelAdmin):
    list_display = (
        "occurred_at",
        "tenant",
        "key_prefix",
        "requested_model",
        "served_model",
        "status",
        "usage_source",
        "input_uncached_tokens",
        "input_cached_tokens",
        "output_tokens",
        "reasoning_tokens",
        "cost",
        "latency_ms",
        "ttft_ms",
    )
    list_filter = ("tenant", "served_model", "status", "usage_source", "streamed", "occurred_at")
    date_hierarchy = "occurred_at"
    search_fields = ("request_id", "requested_model", "api_key__prefix")
    list_select_related = ("tenant", "api_key", "served_model")
    show_full_result_count = False  # COUNT(*) over a big ledger is slow and rarely needed

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in self.model._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="key", ordering="api_key__prefix")
    def key_prefix(self, event: UsageEvent) -> str:
        return f"{event.api_key.prefix}…"


class TenantPriceForm(forms.ModelForm):
    class Meta:
        model = TenantPrice
        fields = (
            "tenant",
            "model",
            "markup_percent",
            "input_per_mtok",
            "cached_input_per_mtok",
            "output_per_mtok",
            "effective_from",
        )
        help_texts = {
            "effective_from": "The new price applies from this instant; the tenant's current "
            "one for the same model (or for every model) ends there.",
        }

    def clean(self):
        data = super().clean()
        try:
            if data.get("effective_from"):
                price_start_check(data["effective_from"])
        except PriceChangeError as exc:
            self.add_error("effective_from", str(exc))
        prices = [
            data.get(f) for f in ("input_per_mtok", "cached_input_per_mtok", "output_per_mtok")
        ]
        if data.get("markup_percent") is not None and any(p is not None for p in prices):
            raise forms.ValidationError("Set a markup or negotiated prices, not both.")
        if data.get("markup_percent") is None and (
            data.get("model") is None or data.get("output_per_mtok") is None
        ):
            raise forms.ValidationError(
                "A negotiated price names a model and sets its output price; a markup may "
                "cover every model."
            )
        return data


@admin.register(TenantPrice)
class TenantPriceAdmin(admin.ModelAdmin):
    """A tenant's own prices. Like list prices, versions are added, never edited."""

    form = TenantPriceForm
    list_display = (
        "tenant",
        "model",
        "markup_percent",
        "output_per_mtok",
        "effective_from",
        "effective_to",
    )
    list_filter = ("tenant",)
    list_select_related = ("tenant", "model")

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def get_changeform_initial_data(self, request):
        initial = super().get_changeform_initial_data(request)
        start = price_change_earliest() + timedelta(minutes=1)
        initial.setdefault("effective_from", start.replace(second=0) + timedelta(minutes=1))
        return initial

    def save_model(self, request, obj, form, change):
        data = form.cleaned_data
        created = tenant_price_set(
            tenant=data["tenant"],
            model=data.get("model"),
            markup_percent=data.get("markup_percent"),
            input_per_mtok=data.get("input_per_mtok"),
            cached_input_per_mtok=data.get("cached_input_per_mtok"),
            output_per_mtok=data.get("output_per_mtok"),
            effective_from=data["effective_from"],
        )
        obj.pk = created.pk
