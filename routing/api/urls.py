from django.urls import path, re_path

from billing.api import v1 as billing_v1

from . import views

urlpatterns = [
    path("chat/completions", views.ChatCompletionsView.as_view(), name="v1-chat-completions"),
    path("models", views.ModelListView.as_view(), name="v1-models"),
    path("budget", views.BudgetView.as_view(), name="v1-budget"),
    path("invoices", billing_v1.InvoiceListView.as_view(), name="v1-invoices"),
    path("invoices/<str:number>", billing_v1.InvoiceDetailView.as_view(), name="v1-invoice"),
    path(
        "invoices/<str:number>/<str:fmt>",
        billing_v1.InvoiceDownloadView.as_view(),
        name="v1-invoice-download",
    ),
    # <path:> because catalog ids contain "/" (Qwen/Qwen3-32B); %2F arrives decoded.
    path("models/<path:model_id>", views.ModelDetailView.as_view(), name="v1-model"),
    re_path(r"^(?P<path>.*)$", views.unknown_endpoint),
]
