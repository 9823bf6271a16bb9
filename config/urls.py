from django.contrib import admin
from django.urls import include, path, re_path
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from routing.api.views import page_not_found, unknown_endpoint
from routing.health import health_page
from routing.metrics import metrics_view
from routing.middleware import OPENAI_ERROR_PATHS

urlpatterns = [
    # The base URL itself, which an OpenAI client never calls: a 404 in OpenAI's shape,
    # where CommonMiddleware would redirect it to v1/ with an HTML body.
    path("v1", unknown_endpoint),
    path("v1/", include("routing.api.urls")),
    path("api/", include("config.api_urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("metrics", metrics_view, name="metrics"),
    # A staff page beside the catalog's admin; before admin/, which would claim the path.
    path("admin/routing/health/", admin.site.admin_view(health_page), name="routing_health"),
    path("admin/", admin.site.urls),
    # Anything else (a base URL without /v1, say): OpenAI's 404, with DEBUG on too, where
    # Django would show its HTML page. The admin and /api/ keep their own 404s.
    re_path(OPENAI_ERROR_PATHS, csrf_exempt(page_not_found)),
]

# Django's error pages outside the views: OpenAI's shape except in the admin and /api/.
handler400 = "routing.api.views.bad_request"
handler404 = "routing.api.views.page_not_found"
handler500 = "routing.api.views.server_error"
