"""The staff console for tenants and keys. Issuing a key shows its secret on the very
next page, once; nothing stores it (not the database, not the session, not a cookie)."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import Count, Q
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from .models import ApiKey, StaffToken, Tenant
from .services import (
    api_key_issue,
    key_revoke,
    staff_token_issue,
    tenant_resume,
    tenant_suspend,
)


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    fields = ("prefix_link", "name", "created_at", "expires_at", "revoked_at", "last_used_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = False
    verbose_name_plural = "API keys (issue new ones from the API keys page)"

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="key")
    def prefix_link(self, key: ApiKey) -> str:
        url = reverse("admin:tenants_apikey_change", args=[key.pk])
        return format_html('<a href="{}">{}…</a>', url, key.prefix)


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = (
        "slug",
        "name",
        "status",
        "timezone",
        "usable_keys",
        "model_count",
        "created_at",
    )
    list_filter = ("status", "timezone")
    search_fields = ("slug", "name", "contact_email")
    prepopulated_fields = {"slug": ("name",)}
    filter_horizontal = ("allowed_models", "members")
    readonly_fields = ("created_at",)
    inlines = [ApiKeyInline]
    actions = ["suspend", "resume"]
    fieldsets = (
        (None, {"fields": ("name", "slug", "status", "contact_email", "timezone", "created_at")}),
        ("Models this tenant may call", {"fields": ("allowed_models",)}),
        ("Users who manage it through the API", {"fields": ("members",), "classes": ["collapse"]}),
    )

    def get_queryset(self, request):
        now = timezone.now()
        usable = Q(api_keys__revoked_at__isnull=True) & (
            Q(api_keys__expires_at__isnull=True) | Q(api_keys__expires_at__gt=now)
        )
        return (
            super()
            .get_queryset(request)
            .annotate(
                usable_key_count=Count("api_keys", filter=usable, distinct=True),
                allowed_count=Count("allowed_models", distinct=True),
            )
        )

    @admin.display(description="usable keys", ordering="usable_key_count")
    def usable_keys(self, tenant: Tenant) -> int:
        return tenant.usable_key_count

    @admin.display(description="models", ordering="allowed_count")
    def model_count(self, tenant: Tenant) -> int:
        return tenant.allowed_count

    @admin.action(description="Suspend selected tenants (blocks all their keys)")
    def suspend(self, request, queryset):
        for tenant in queryset:
            tenant_suspend(tenant=tenant)
        self.message_user(request, f"Suspended {queryset.count()} tenant(s).", messages.WARNING)

    @admin.action(description="Resume selected tenants")
    def resume(self, request, queryset):
        for tenant in queryset:
            tenant_resume(tenant=tenant)
        self.message_user(request, f"Resumed {queryset.count()} tenant(s).")


class KeyAdminBase(admin.ModelAdmin):
    """Shared by API keys and staff tokens: issue through the service, show the secret once."""

    issued_template = "admin/tenants/key_issued.html"
    actions = ["revoke"]
    readonly_fields = ("prefix", "created_at", "revoked_at", "last_used_at")
    list_filter = ("revoked_at",)

    def issue(self, request, obj, form):
        raise NotImplementedError

    def has_delete_permission(self, request, obj=None) -> bool:
        # Keys are revoked, never deleted: the ledger refers to them.
        return False

    def get_readonly_fields(self, request, obj=None):
        fields = list(super().get_readonly_fields(request, obj))
        if obj is not None:
            fields += [f for f in self.owner_fields if f not in fields]
        return fields

    def save_model(self, request, obj, form, change):
        if change:
            super().save_model(request, obj, form, change)
            return
        issued = self.issue(request, obj, form)
        obj.pk = issued.key.pk
        request._issued_secret = issued.secret

    def save_related(self, request, form, formsets, change):
        if change:
            super().save_related(request, form, formsets, change)

    def response_add(self, request, obj, post_url_continue=None):
        secret = getattr(request, "_issued_secret", None)
        if secret is None:
            return super().response_add(request, obj, post_url_continue)
        key = type(obj).objects.get(pk=obj.pk)
        opts = self.model._meta
        response = TemplateResponse(
            request,
            self.issued_template,
            {
                **self.admin_site.each_context(request),
                "opts": opts,
                "title": f"{opts.verbose_name.capitalize()} issued",
                "key": key,
                "secret": secret,
                "changelist_url": reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist"),
            },
        )
        response["Cache-Control"] = "no-store"  # the secret must not linger in a cache
        return response

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset):
        count = 0
        for key in queryset.filter(revoked_at__isnull=True):
            key_revoke(key=key)
            count += 1
        self.message_user(request, f"Revoked {count} key(s).", messages.WARNING)

    @admin.display(description="state")
    def state(self, key) -> str:
        if key.revoked_at is not None:
            return "revoked"
        if key.expires_at is not None and key.expires_at <= timezone.now():
            return "expired"
        return "active"


@admin.register(ApiKey)
class ApiKeyAdmin(KeyAdminBase):
    list_display = ("prefix", "tenant", "name", "state", "created_at", "expires_at", "last_used_at")
    list_filter = ("tenant", "revoked_at")
    search_fields = ("prefix", "name", "tenant__slug")
    list_select_related = ("tenant",)
    filter_horizontal = ("allowed_models",)
    fields = (
        "tenant",
        "name",
        "expires_at",
        "allowed_models",
        "prefix",
        "created_at",
        "revoked_at",
        "last_used_at",
    )
    owner_fields = ("tenant",)

    def issue(self, request, obj, form):
        narrowed = form.cleaned_data.get("allowed_models") or []
        return api_key_issue(
            tenant=obj.tenant,
            name=obj.name,
            expires_at=obj.expires_at,
            model_ids=[m.public_id for m in narrowed],
        )


@admin.register(StaffToken)
class StaffTokenAdmin(KeyAdminBase):
    list_display = ("prefix", "user", "name", "state", "created_at", "expires_at", "last_used_at")
    list_select_related = ("user",)
    search_fields = ("prefix", "name", "user__username")
    fields = ("user", "name", "expires_at", "prefix", "created_at", "revoked_at", "last_used_at")
    owner_fields = ("user",)

    def issue(self, request, obj, form):
        return staff_token_issue(user=obj.user, name=obj.name, expires_at=obj.expires_at)
