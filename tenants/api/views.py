from __future__ import annotations

from django.db import transaction
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status
from rest_framework.decorators import action
from rest_framework.response import Response

from ..models import ApiKey, Tenant
from ..services import (
    UnknownModelsError,
    api_key_issue,
    key_revoke,
    tenant_allowlist_set,
    tenant_create,
    tenant_resume,
    tenant_suspend,
)
from .scoping import IsSuperuser, SuperuserWritesMembersRead, TenantScopedViewSet
from .serializers import (
    AllowlistSerializer,
    ApiKeySerializer,
    IssuedApiKeySerializer,
    TenantSerializer,
)


class TenantViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.UpdateModelMixin,
    TenantScopedViewSet,
):
    """Tenants. Members read their own; superusers create, change, suspend and resume."""

    queryset = Tenant.objects.prefetch_related("allowed_models").order_by("slug")
    serializer_class = TenantSerializer
    permission_classes = [SuperuserWritesMembersRead]
    lookup_field = "slug"
    tenant_field = ""

    def perform_create(self, serializer):
        data = serializer.validated_data
        serializer.instance = tenant_create(
            slug=data["slug"],
            name=data["name"],
            model_ids=[m.public_id for m in data.get("allowed_models", [])],
            contact_email=data.get("contact_email", ""),
            timezone_name=data.get("timezone", "UTC"),
        )

    @extend_schema(request=None, responses=TenantSerializer)
    @action(detail=True, methods=["post"], permission_classes=[IsSuperuser])
    def suspend(self, request, slug=None):
        tenant = self.get_object()
        tenant_suspend(tenant=tenant)
        return Response(TenantSerializer(tenant, context={"request": request}).data)

    @extend_schema(request=None, responses=TenantSerializer)
    @action(detail=True, methods=["post"], permission_classes=[IsSuperuser])
    def resume(self, request, slug=None):
        tenant = self.get_object()
        tenant_resume(tenant=tenant)
        return Response(TenantSerializer(tenant, context={"request": request}).data)

    @extend_schema(request=AllowlistSerializer, responses=AllowlistSerializer)
    @action(
        detail=True,
        methods=["get", "put"],
        url_path="models",
        permission_classes=[SuperuserWritesMembersRead],
    )
    def allowlist(self, request, slug=None):
        """The tenant's model allowlist: GET it, or PUT the whole list."""
        tenant = self.get_object()
        if request.method == "PUT":
            body = AllowlistSerializer(data=request.data)
            body.is_valid(raise_exception=True)
            try:
                tenant_allowlist_set(tenant=tenant, model_ids=body.validated_data["models"])
            except UnknownModelsError as exc:
                return Response(
                    {"models": [f"Unknown model ids: {', '.join(exc.unknown)}"]},
                    status=status.HTTP_400_BAD_REQUEST,
                )
        models = sorted(tenant.allowed_models.values_list("public_id", flat=True))
        return Response({"models": models})


class ApiKeyViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    TenantScopedViewSet,
):
    """API keys of the tenants you manage. Creating one returns its secret, once."""

    queryset = (
        ApiKey.objects.select_related("tenant")
        .prefetch_related("allowed_models")
        .order_by("-created_at")
    )
    serializer_class = ApiKeySerializer
    lookup_field = "prefix"
    lookup_value_regex = "[^/]+"

    def get_queryset(self):
        queryset = super().get_queryset()
        tenant = self.request.query_params.get("tenant")
        return queryset.filter(tenant__slug=tenant) if tenant else queryset

    @extend_schema(request=ApiKeySerializer, responses={201: IssuedApiKeySerializer})
    def create(self, request, *args, **kwargs):
        serializer = ApiKeySerializer(data=request.data, context=self.get_serializer_context())
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        with transaction.atomic():
            issued = api_key_issue(
                tenant=data["tenant"],
                name=data.get("name", ""),
                expires_at=data.get("expires_at"),
                model_ids=[m.public_id for m in data.get("allowed_models", [])],
            )
        issued.key.secret = issued.secret
        body = IssuedApiKeySerializer(issued.key, context=self.get_serializer_context()).data
        response = Response(body, status=status.HTTP_201_CREATED)
        response["Cache-Control"] = "no-store"
        return response

    @extend_schema(request=None, responses=ApiKeySerializer)
    @action(detail=True, methods=["post"])
    def revoke(self, request, prefix=None):
        """Revoke the key: refused from its next request on."""
        key = self.get_object()
        key_revoke(key=key)
        return Response(self.get_serializer(key).data)
