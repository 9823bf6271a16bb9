"""The staff console for tenants and keys. Issuing a key shows its secret on the very
next page, once; nothing stores it (not the database, not the session, not a cookie)."""

from __future__ import annotations

from datetime import timedelta

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ActionForm
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.db import models
from django.db.models import Count, Q
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from config.admin_base import ModelAdmin

from .alerts import webhook_signing_secret
from .budgets import budget_set, budget_status, usd_format
from .models import ApiKey, Budget, BudgetAlert, StaffToken, Tenant, WebhookDelivery
from .services import (
    api_key_issue,
    api_key_models_check,
    api_key_rotate,
    key_revoke,
    staff_token_issue,
    tenant_allowlist_check,
    tenant_resume,
    tenant_suspend,
)


def budget_bar(budget: Budget | None) -> str:
    """This month's spent and reserved against the limit, with a bar."""
    if budget is None:
        return "No budget."
    status = budget_status(budget)
    percent = min(float(status.used_percent), 100.0)  # display width only
    colour = "#ba2121" if status.used_percent >= 100 else "#417690"
    return format_html(
        '<div style="width:22em;background:#eee;border-radius:3px">'
        '<div style="width:{}%;background:{};height:0.9em;border-radius:3px"></div></div>'
        "{} of {} spent ({}%), {} reserved, {} left until {} UTC ({} budget)",
        f"{percent:.1f}",
        colour,
        usd_format(status.spent),
        usd_format(budget.limit_usd),
        status.used_percent,
        usd_format(status.reserved),
        usd_format(status.remaining),
        status.period_end.strftime("%Y-%m-%d %H:%M"),
        "hard" if budget.hard else "soft",
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


class TenantForm(forms.ModelForm):
    class Meta:
        model = Tenant
        fields = ("allowed_models",)  # the admin's fieldsets add the rest

    def clean(self):
        data = super().clean()
        models = data.get("allowed_models")
        if models is not None and self.instance.pk is not None:
            tenant_allowlist_check(tenant=self.instance, models=models)
        return data


@admin.register(Tenant)
class TenantAdmin(ModelAdmin):
    form = TenantForm
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
    readonly_fields = ("created_at", "budget_this_month", "webhook_secret")
    # A URL typed without a scheme means https (Django 6's default, adopted now).
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}
    inlines = [ApiKeyInline]
    actions = ["suspend", "resume"]
    fieldsets = (
        (None, {"fields": ("name", "slug", "status", "contact_email", "timezone", "created_at")}),
        ("Budget", {"fields": ("budget_this_month",)}),
        (
            "Budget alerts",
            {"fields": ("alert_webhook_url", "webhook_secret"), "classes": ["collapse"]},
        ),
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

    @admin.display(description="this month")
    def budget_this_month(self, tenant: Tenant) -> str:
        if tenant.pk is None:
            return "Save the tenant first, then set a budget."
        return budget_bar(Budget.objects.filter(tenant=tenant, api_key__isnull=True).first())

    @admin.display(description="webhook signing secret")
    def webhook_secret(self, tenant: Tenant) -> str:
        if tenant.pk is None:
            return "-"
        return format_html(
            "<code>{}</code><br>Receivers check the <code>Tollgate-Signature</code> header: "
            't=timestamp, v1=HMAC-SHA256 of "timestamp.body" under this secret.',
            webhook_signing_secret(tenant),
        )

    @admin.display(description="usable keys", ordering="usable_key_count")
    def usable_keys(self, tenant: Tenant) -> int:
        return tenant.usable_key_count

    @admin.display(description="models", ordering="allowed_count")
    def model_count(self, tenant: Tenant) -> int:
        return tenant.allowed_count

    @admin.action(
        description="Suspend selected tenants (blocks all their keys)", permissions=["change"]
    )
    def suspend(self, request, queryset):
        for tenant in queryset:
            tenant_suspend(tenant=tenant)
            self.log_change(request, tenant, "Suspended.")
        self.message_user(request, f"Suspended {queryset.count()} tenant(s).", messages.WARNING)

    @admin.action(description="Resume selected tenants", permissions=["change"])
    def resume(self, request, queryset):
        for tenant in queryset:
            tenant_resume(tenant=tenant)
            self.log_change(request, tenant, "Resumed.")
        self.message_user(request, f"Resumed {queryset.count()} tenant(s).")


class RotateActionForm(ActionForm):
    # Text, checked by the action: a value the action bar's form refuses is reported by
    # Django as "No action selected", whatever was wrong with it.
    grace_hours = forms.CharField(
        label="grace period (hours, for rotation)", required=False, initial="24"
    )


MAX_GRACE_HOURS = 90 * 24  # as the API allows


class KeyAdminBase(ModelAdmin):
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
        obj.pk, obj.prefix = issued.key.pk, issued.key.prefix  # the history names the key
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

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke(self, request, queryset):
        count = 0
        for key in queryset.filter(revoked_at__isnull=True):
            key_revoke(key=key)
            self.log_change(request, key, "Revoked.")
            count += 1
        self.message_user(request, f"Revoked {count} key(s).", messages.WARNING)

    @admin.display(description="state")
    def state(self, key) -> str:
        if key.revoked_at is not None:
            return "revoked"
        if key.expires_at is not None and key.expires_at <= timezone.now():
            return "expired"
        return "active"


class ApiKeyForm(forms.ModelForm):
    def clean(self):
        data = super().clean()
        # The tenant is read-only once the key is issued: then it is the key's own.
        tenant = data.get("tenant") if "tenant" in self.fields else self.instance.tenant
        if tenant is not None and data.get("allowed_models"):
            api_key_models_check(tenant=tenant, models=data["allowed_models"])
        return data


@admin.register(ApiKey)
class ApiKeyAdmin(KeyAdminBase):
    form = ApiKeyForm
    list_display = ("prefix", "tenant", "name", "state", "created_at", "expires_at", "last_used_at")
    list_filter = ("tenant", "revoked_at")
    search_fields = ("prefix", "name", "tenant__slug")
    list_select_related = ("tenant",)
    filter_horizontal = ("allowed_models",)
    fieldsets = (
        (None, {"fields": ("tenant", "name", "expires_at", "allowed_models")}),
        ("Rate limits", {"fields": ("rpm_limit", "tpm_limit", "concurrency_limit")}),
        ("Budget", {"fields": ("budget_this_month",)}),
        (
            "History",
            {"fields": ("prefix", "created_at", "revoked_at", "last_used_at", "replaced_by")},
        ),
    )
    readonly_fields = (*KeyAdminBase.readonly_fields, "replaced_by", "budget_this_month")
    owner_fields = ("tenant",)
    action_form = RotateActionForm
    actions = ["revoke", "rotate"]

    @admin.display(description="this month")
    def budget_this_month(self, key: ApiKey) -> str:
        if key.pk is None:
            return "Issue the key first, then set a budget."
        return budget_bar(Budget.objects.filter(api_key=key).first())

    @admin.action(
        description="Rotate selected keys (new secrets shown once)", permissions=["add", "change"]
    )
    def rotate(self, request, queryset):
        try:
            hours = float(request.POST.get("grace_hours") or 24)
        except ValueError:
            hours = -1.0
        if not 0 <= hours <= MAX_GRACE_HOURS:  # NaN fails too
            self.message_user(
                request,
                f"The grace period is a number of hours from 0 to {MAX_GRACE_HOURS}.",
                messages.ERROR,
            )
            return None
        grace = timedelta(hours=hours)
        rotated, skipped = [], 0
        for key in queryset.select_related("tenant"):
            if not key.is_usable():
                skipped += 1
                continue
            try:
                issued = api_key_rotate(key=key, grace=grace)
            except ValueError as exc:
                self.message_user(request, str(exc), messages.ERROR)
                continue
            rotated.append((key, issued))
            self.log_change(request, key, f"Rotated: replaced by {issued.key.prefix}….")
            self.log_addition(request, issued.key, f"Issued to replace {key.prefix}….")
        if skipped:
            self.message_user(request, f"Skipped {skipped} revoked or expired key(s).")
        if not rotated:
            return None
        response = TemplateResponse(
            request,
            "admin/tenants/keys_rotated.html",
            {
                **self.admin_site.each_context(request),
                "opts": self.model._meta,
                "title": "Keys rotated",
                "rotated": rotated,
                "grace": grace,
                "changelist_url": reverse("admin:tenants_apikey_changelist"),
            },
        )
        response["Cache-Control"] = "no-store"
        return response

    def issue(self, request, obj, form):
        narrowed = form.cleaned_data.get("allowed_models") or []
        return api_key_issue(
            tenant=obj.tenant,
            name=obj.name,
            expires_at=obj.expires_at,
            model_ids=[m.public_id for m in narrowed],
            rpm_limit=obj.rpm_limit,
            tpm_limit=obj.tpm_limit,
            concurrency_limit=obj.concurrency_limit,
        )


@admin.register(StaffToken)
class StaffTokenAdmin(KeyAdminBase):
    list_display = ("prefix", "user", "name", "state", "created_at", "expires_at", "last_used_at")
    list_select_related = ("user",)
    search_fields = ("prefix", "name", "user__username")
    fields = ("user", "name", "expires_at", "prefix", "created_at", "revoked_at", "last_used_at")
    owner_fields = ("user",)

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        # A token acts with its user's powers: a staff user issues tokens for themselves,
        # only a superuser for others.
        if db_field.name == "user" and not request.user.is_superuser:
            kwargs["queryset"] = get_user_model().objects.filter(pk=request.user.pk)
            kwargs["initial"] = request.user.pk
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def issue(self, request, obj, form):
        if obj.user_id != request.user.pk and not request.user.is_superuser:
            raise PermissionDenied("Only a superuser issues a staff token for another user.")
        return staff_token_issue(user=obj.user, name=obj.name, expires_at=obj.expires_at)


class BudgetForm(forms.ModelForm):
    class Meta:
        model = Budget
        fields = ("tenant", "api_key", "limit_usd", "hard", "alert_thresholds")

    def clean(self):
        data = super().clean()
        key, tenant = data.get("api_key"), data.get("tenant")
        if key is not None and tenant is not None and key.tenant_id != tenant.pk:
            self.add_error("api_key", "This key belongs to another tenant.")
        return data


@admin.register(Budget)
class BudgetAdmin(ModelAdmin):
    form = BudgetForm
    list_display = ("tenant", "scope_label", "limit_usd", "hard", "this_month")
    list_filter = ("hard", "tenant")
    list_select_related = ("tenant", "api_key")
    readonly_fields = ("this_month", "created_at", "updated_at")
    fields = ("tenant", "api_key", "limit_usd", "hard", "alert_thresholds", "this_month")

    def get_readonly_fields(self, request, obj=None):
        # A budget stays with its tenant or key: another scope is another budget (saving
        # through budget_set would have made one and left this one in force).
        if obj is not None:
            return (*self.readonly_fields, "tenant", "api_key")
        return self.readonly_fields

    def save_model(self, request, obj, form, change):
        # Through the service: a lower limit alerts at once for thresholds already passed.
        saved = budget_set(
            tenant=obj.tenant,
            key=obj.api_key,
            limit_usd=obj.limit_usd,
            hard=obj.hard,
            alert_thresholds=obj.alert_thresholds,
        )
        obj.pk = saved.pk

    @admin.display(description="scope")
    def scope_label(self, budget: Budget) -> str:
        return f"key {budget.api_key.prefix}…" if budget.api_key_id else "whole tenant"

    @admin.display(description="this month")
    def this_month(self, budget: Budget) -> str:
        return budget_bar(budget) if budget.pk else "-"


class ReadOnlyAdmin(ModelAdmin):
    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(BudgetAlert)
class BudgetAlertAdmin(ReadOnlyAdmin):
    list_display = ("period", "threshold", "spent", "created_at", "emailed_at", "webhooks")
    list_select_related = ("period__budget__tenant", "period__budget__api_key")
    list_filter = ("period__budget__tenant", "threshold")
    search_fields = ("period__budget__tenant__slug", "period__budget__api_key__prefix")

    @admin.display(description="spent")
    def spent(self, alert: BudgetAlert) -> str:
        from .budgets import pico_to_usd

        return usd_format(pico_to_usd(alert.spent_pico))

    @admin.display(description="webhook attempts")
    def webhooks(self, alert: BudgetAlert) -> str:
        return format_html_join(
            ", ",
            "#{} {}",
            ((d.attempt, d.status_code or d.error or "-") for d in alert.deliveries.all()),
        )


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "tenant", "event", "attempt", "status_code", "succeeded", "url")
    list_filter = ("succeeded", "event", "tenant")
    list_select_related = ("tenant",)
