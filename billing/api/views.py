from __future__ import annotations

from django.utils.dateparse import parse_datetime
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import mixins
from rest_framework.exceptions import ValidationError

from tenants.api.scoping import TenantScopedViewSet

from ..models import UsageEvent
from .serializers import UsageEventSerializer

_FILTERS = [
    OpenApiParameter("tenant", str, description="Tenant slug."),
    OpenApiParameter("model", str, description="Served model's public id."),
    OpenApiParameter("status", str, enum=[s for s, _ in UsageEvent.Status.choices]),
    OpenApiParameter("since", str, description="ISO 8601 instant, inclusive."),
    OpenApiParameter("until", str, description="ISO 8601 instant, exclusive."),
]


@extend_schema_view(list=extend_schema(parameters=_FILTERS))
class UsageEventViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, TenantScopedViewSet):
    """The usage ledger of the tenants you manage, newest first. Read-only."""

    queryset = UsageEvent.objects.select_related(
        "tenant", "api_key", "served_model", "provider"
    ).order_by("-occurred_at", "-id")
    serializer_class = UsageEventSerializer

    def get_queryset(self):
        queryset = super().get_queryset()
        if self.action != "list":
            return queryset
        params = self.request.query_params
        if params.get("tenant"):
            queryset = queryset.filter(tenant__slug=params["tenant"])
        if params.get("model"):
            queryset = queryset.filter(served_model__public_id=params["model"])
        if params.get("status"):
            if params["status"] not in UsageEvent.Status.values:
                raise ValidationError({"status": f"One of {', '.join(UsageEvent.Status.values)}."})
            queryset = queryset.filter(status=params["status"])
        for name, lookup in (("since", "occurred_at__gte"), ("until", "occurred_at__lt")):
            if params.get(name):
                instant = parse_datetime(params[name])
                if instant is None or instant.tzinfo is None:
                    raise ValidationError({name: "An ISO 8601 instant with a UTC offset."})
                queryset = queryset.filter(**{lookup: instant})
        return queryset
