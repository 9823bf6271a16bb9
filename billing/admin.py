"""Billing in the staff console: the usage ledger (read-only, filterable by tenant, model
and day), tenant prices (versions added, never edited) and invoices (built, never edited)."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME, ActionForm
from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from config.admin_base import ModelAdmin
from routing.admin import PriceVersionAdmin, PriceVersionForm
from routing.services import PriceChangeError
from tenants.models import Tenant

from .exports import FORMATS, invoice_export, invoice_key_totals, invoices_zip
from .invoicing import (
    InvoiceError,
    MonthClosed,
    draft_dropped_if_empty,
    invoice_build,
    invoice_correct,
    invoice_finalize,
    invoice_mark_paid,
    invoice_void,
    month_close,
    month_parse,
    month_started_check,
    unpriced_models,
    unpriced_note,
)
from .models import Invoice, InvoiceLine, TenantPrice, UsageEvent
from .pricing import tenant_price_cancel, tenant_price_change_check, tenant_price_set


@admin.register(UsageEvent)
class UsageEventAdmin(ModelAdmin):
    list_display = (
        "occurred_at",
        "tenant",
        "key_prefix",
        "requested_model",
        "served_model",
        "attempt",
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


class TenantPriceForm(PriceVersionForm):
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

    def clean_markup_percent(self):
        markup = self.cleaned_data.get("markup_percent")
        if markup is not None and markup <= -100:
            raise forms.ValidationError("A markup is above -100 % (-100 % would bill nothing).")
        return markup

    def clean(self):
        data = super().clean()
        if data.get("tenant") and data.get("effective_from") and not self.has_error("model"):
            try:
                tenant_price_change_check(
                    tenant=data["tenant"],
                    model=data.get("model"),
                    effective_from=data["effective_from"],
                )
            except PriceChangeError as exc:
                self.add_error("effective_from", str(exc))
        # A markup or negotiated prices, not both, and a negotiated price's model and output
        # price: the model's constraints say so, in words, after this (and not where one of
        # their fields was already refused on its own).
        return data


@admin.register(TenantPrice)
class TenantPriceAdmin(PriceVersionAdmin):
    """A tenant's own prices. Like list prices, versions are added, never edited, and a
    scheduled one may be withdrawn."""

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

    def withdraw(self, price: TenantPrice) -> None:
        tenant_price_cancel(price)

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


def _draft(tenant: Tenant, month) -> MonthClosed:
    try:
        month_started_check(tenant, month)
        invoice = invoice_build(tenant=tenant, month=month)
    except InvoiceError as exc:
        return MonthClosed(tenant, f"not built: {exc}")
    if draft_dropped_if_empty(invoice):
        return MonthClosed(tenant, "no usage")
    outcome = "draft built" if invoice.status == Invoice.Status.DRAFT else "already numbered"
    return MonthClosed(tenant, outcome, invoice)


class InvoiceMonthFilter(admin.SimpleListFilter):
    """The months invoiced, newest first (Django's date filter offers "today" and "past
    7 days", none of which a first-of-month date answers)."""

    title = "month"
    parameter_name = "month"

    def lookups(self, request, model_admin):
        months = Invoice.objects.dates("month", "month", order="DESC")
        return [(f"{m:%Y-%m}", f"{m:%Y-%m}") for m in months]

    def queryset(self, request, queryset):
        value = self.value()
        if not value:
            return queryset
        try:
            month = month_parse(value)
        except InvoiceError:
            return queryset.none()
        return queryset.filter(month=month)


class InvoiceActionForm(ActionForm):
    # No limits here: a value the action bar's form refuses is reported by Django as "No
    # action selected"; the action says what is wrong instead.
    reason = forms.CharField(label="reason (to void)", required=False)


class AcceptUnpricedForm(forms.Form):
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text="Why these tokens are finalized unbilled. Stored on each invoice and shown "
        "by every export.",
    )


class CloseMonthForm(forms.Form):
    month = forms.RegexField(r"^\d{4}-\d{2}$", help_text="YYYY-MM, in each tenant's time zone.")
    tenant = forms.ModelChoiceField(
        Tenant.objects.order_by("slug"), required=False, empty_label="every tenant"
    )

    def clean_month(self):
        try:
            return month_parse(self.cleaned_data["month"])
        except InvoiceError as exc:
            raise forms.ValidationError(str(exc)) from None


class InvoiceLineInline(admin.TabularInline):
    model = InvoiceLine
    fields = (
        "usage_month",
        "model_name",
        "price",
        "tenant_price",
        "bucket",
        "quantity",
        "unit_price",
        "amount_exact",
        "amount",
    )
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Invoice)
class InvoiceAdmin(ModelAdmin):
    """Invoices: built from the ledger, never edited. Drafts are rebuilt, finalized ones
    are paid or voided (then corrected) through the actions; every field is read-only."""

    action_form = InvoiceActionForm
    actions = [
        "rebuild",
        "finalize",
        "finalize_accepting_unpriced",
        "mark_paid",
        "void",
        "correct",
        "zip_csv",
        "zip_json",
        "zip_html",
        "zip_pdf",
    ]
    list_display = (
        "__str__",
        "tenant",
        "month_label",
        "status",
        "total",
        "currency",
        "finalized_at",
        "paid_at",
        "download_links",
    )
    list_filter = ("status", InvoiceMonthFilter, "tenant")
    list_select_related = ("tenant",)
    search_fields = ("number", "tenant__slug", "tenant__name")
    inlines = [InvoiceLineInline]
    exclude = ()

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in self.model._meta.fields] + ["download_links", "by_key"]

    def get_fields(self, request, obj=None):
        return [
            *(f.name for f in self.model._meta.fields if f.name != "id"),
            "download_links",
            "by_key",
        ]

    def has_add_permission(self, request) -> bool:
        return False  # built from the ledger: the "rebuild" action or close_month

    def has_change_permission(self, request, obj=None) -> bool:
        return False  # nothing is typed in; the actions change the status

    def has_delete_permission(self, request, obj=None) -> bool:
        # Only a draft may go (it is rebuilt at will); a numbered invoice never does.
        return obj is not None and obj.status == Invoice.Status.DRAFT

    def has_lifecycle_permission(self, request) -> bool:
        """Building, finalizing, paying, voiding and correcting: superusers only."""
        return request.user.is_superuser

    def get_actions(self, request):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions

    def get_urls(self):
        download = path(
            "<int:pk>/download/<str:fmt>/",
            self.admin_site.admin_view(self.download_view),
            name="billing_invoice_download",
        )
        close = path(
            "close-month/",
            self.admin_site.admin_view(self.close_month_view),
            name="billing_invoice_close_month",
        )
        return [download, close, *super().get_urls()]

    def close_month_view(self, request):
        """Build every tenant's drafts for a month, or finalize them (like close_month)."""
        if not request.user.is_superuser:
            raise PermissionDenied
        form = CloseMonthForm(request.POST or None)
        results = None
        if request.method == "POST" and form.is_valid():
            month, tenant = form.cleaned_data["month"], form.cleaned_data["tenant"]
            tenants = [tenant] if tenant else Tenant.objects.order_by("slug")
            if "finalize" in request.POST:
                results = month_close(month=month, tenants=tenants)
            else:
                results = [_draft(t, month) for t in tenants]
        opts = self.model._meta
        return TemplateResponse(
            request,
            "admin/billing/invoice/close_month.html",
            {
                **self.admin_site.each_context(request),
                "opts": opts,
                "title": "Build or close a month",
                "form": form,
                "results": results,
                "changelist_url": reverse("admin:billing_invoice_changelist"),
            },
        )

    def download_view(self, request, pk: int, fmt: str):
        invoice = self.get_object(request, str(pk))
        if invoice is None or fmt not in FORMATS or not self.has_view_permission(request, invoice):
            raise Http404("No such invoice or format.")
        return invoice_export(invoice, fmt).response()

    @admin.display(description="month", ordering="month")
    def month_label(self, invoice: Invoice) -> str:
        return f"{invoice.month:%Y-%m}"

    @admin.display(description="download")
    def download_links(self, invoice: Invoice) -> str:
        return format_html_join(
            " · ",
            '<a href="{}">{}</a>',
            (
                (reverse("admin:billing_invoice_download", args=[invoice.pk, fmt]), fmt.upper())
                for fmt in FORMATS
            ),
        )

    @admin.display(description="by API key")
    def by_key(self, invoice: Invoice) -> str:
        keys = invoice_key_totals(invoice)
        if not keys:
            return "-"
        rows = format_html_join(
            "",
            "<tr><td>{}…</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    k["key"],
                    k["name"],
                    k["tokens"]["input"],
                    k["tokens"]["cached_input"],
                    k["tokens"]["output"],
                    k["amount"],
                )
                for k in keys
            ),
        )
        return format_html(
            "<table><tr><th>key</th><th>name</th><th>input</th><th>cached input</th>"
            "<th>output</th><th>amount</th></tr>{}</table>",
            rows,
        )

    def _each(self, request, queryset, verb: str, step) -> None:
        done, refused = 0, []
        for invoice in queryset.select_related("tenant"):
            try:
                step(invoice)
                done += 1
            except InvoiceError as exc:
                refused.append(f"{invoice}: {exc}")
            else:
                self.log_change(request, Invoice.objects.get(pk=invoice.pk), f"{verb}.")
        if done:
            self.message_user(request, f"{verb} {done} invoice(s).")
        for message in refused:
            self.message_user(request, message, messages.ERROR)

    @admin.action(description="Rebuild selected drafts from the ledger", permissions=["lifecycle"])
    def rebuild(self, request, queryset):
        def step(invoice):
            if invoice.status != Invoice.Status.DRAFT:
                raise InvoiceError(f"it is {invoice.status}, not a draft.")
            invoice_build(tenant=invoice.tenant, month=invoice.month)

        self._each(request, queryset, "Rebuilt", step)

    @admin.action(description="Finalize selected drafts (numbers them)", permissions=["lifecycle"])
    def finalize(self, request, queryset):
        def step(invoice):
            if invoice.status != Invoice.Status.DRAFT:
                raise InvoiceError(f"it is already {invoice.status}.")
            invoice_finalize(invoice=invoice)

        self._each(request, queryset, "Finalized", step)

    @admin.action(
        description="Finalize selected drafts, accepting their unpriced usage unbilled (asks why)",
        permissions=["lifecycle"],
    )
    def finalize_accepting_unpriced(self, request, queryset):
        """An intermediate page: the drafts, their unpriced tokens, and a reason to give;
        on confirmation each is finalized with the reason stored on it."""
        drafts = list(queryset.select_related("tenant").order_by("month", "tenant__slug"))
        form = AcceptUnpricedForm(request.POST if "confirm" in request.POST else None)
        if form.is_valid():
            reason, user = form.cleaned_data["reason"], request.user.get_username()

            def step(invoice):
                if invoice.status != Invoice.Status.DRAFT:
                    raise InvoiceError(f"it is already {invoice.status}.")
                done = invoice_finalize(invoice=invoice, accept_unpriced=reason, accepted_by=user)
                if done.unpriced_tokens:
                    self.message_user(request, f"{done}: {unpriced_note(done)}.", messages.WARNING)

            return self._each(request, queryset, "Finalized", step)
        return TemplateResponse(
            request,
            "admin/billing/invoice/accept_unpriced.html",
            {
                **self.admin_site.each_context(request),
                "opts": self.model._meta,
                "title": "Finalize, accepting unpriced usage unbilled",
                "form": form,
                "invoices": [(i, unpriced_models(i)) for i in drafts],
                "action": "finalize_accepting_unpriced",
                "action_checkbox_name": ACTION_CHECKBOX_NAME,
                "changelist_url": reverse("admin:billing_invoice_changelist"),
            },
        )

    @admin.action(description="Mark selected invoices paid", permissions=["lifecycle"])
    def mark_paid(self, request, queryset):
        self._each(request, queryset, "Marked paid", lambda i: invoice_mark_paid(invoice=i))

    @admin.action(description="Void selected invoices (give the reason)", permissions=["lifecycle"])
    def void(self, request, queryset):
        reason = request.POST.get("reason", "")
        self._each(request, queryset, "Voided", lambda i: invoice_void(invoice=i, reason=reason))

    @admin.action(
        description="Correct selected void invoices (a new draft each)", permissions=["lifecycle"]
    )
    def correct(self, request, queryset):
        def step(invoice):
            if hasattr(invoice, "corrected_by"):
                raise InvoiceError(f"it is corrected already, by {invoice.corrected_by}.")
            invoice_correct(voided=invoice)

        self._each(request, queryset, "Corrected", step)

    def _zip(self, queryset, fmt: str):
        invoices = queryset.select_related("tenant", "corrects").order_by("month", "number")
        months = sorted({f"{i.month:%Y-%m}" for i in invoices})
        name = f"invoices-{months[0]}" if len(months) == 1 else "invoices"
        return invoices_zip(invoices, fmt, name=name).response()

    @admin.action(description="Download selected as a ZIP of CSV files")
    def zip_csv(self, request, queryset):
        return self._zip(queryset, "csv")

    @admin.action(description="Download selected as a ZIP of JSON files")
    def zip_json(self, request, queryset):
        return self._zip(queryset, "json")

    @admin.action(description="Download selected as a ZIP of printable HTML invoices")
    def zip_html(self, request, queryset):
        return self._zip(queryset, "html")

    @admin.action(description="Download selected as a ZIP of PDF invoices")
    def zip_pdf(self, request, queryset):
        return self._zip(queryset, "pdf")
