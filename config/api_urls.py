"""The management API under /api/: one router over each app's viewsets."""

from rest_framework.routers import DefaultRouter

from billing.api.views import InvoiceViewSet, UsageEventViewSet
from routing.api.management import RouteViewSet
from tenants.api.views import ApiKeyViewSet, BudgetViewSet, TenantViewSet

router = DefaultRouter()
# The trailing slash optional: a POST without it would otherwise be redirected (301) and
# resent by the client as a GET, which lists instead of creating. The schema keeps "/".
router.trailing_slash = "/?"
router.register("tenants", TenantViewSet, basename="tenant")
router.register("keys", ApiKeyViewSet, basename="apikey")
router.register("budgets", BudgetViewSet, basename="budget")
router.register("usage", UsageEventViewSet, basename="usage")
router.register("invoices", InvoiceViewSet, basename="invoice")
router.register("routes", RouteViewSet, basename="route")

urlpatterns = router.urls
