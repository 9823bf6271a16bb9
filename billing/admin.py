"""The usage ledger in the staff console: read-only, filterable by tenant, model and day."""

from __future__ import annotations

from django.contrib import admin

from .models import UsageEvent


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
