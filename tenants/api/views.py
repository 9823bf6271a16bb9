from __future__ import annotations

from datetime import timedelta

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response

from ..alerts import webhook_signing_secret
from ..budgets import budget_set
from ..models import ApiKey, Budget, Tenant, tenant_slug_normalize
from ..services import (
    UnknownModelsError,
    api_key_issue,
    api_key_rotate,
    key_revoke,
    tenant_allowlist_set,
    tenant_create,
    tenant_resume,
    tenant_suspend,
    tenant_update,
)
from .scoping import IsSuperuser, SuperuserWritesMembersRead, TenantScopedViewSet
from .serializers import (
    AllowlistSerializer,
    ApiKeySerializer,
    ApiKeyUpdateSerializer,
    BudgetSerializer,
    IssuedApiKeySerializer,
    RotateSerializer,
    TenantSerializer,
    WebhookSecretSerializer,
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

    def get_object(self):
        # The slug in the URL names the tenant in any case (/api/tenants/ACME/ is acme),
        # looked up among the tenants the user may see, as any object is.
        self.kwargs[self.lookup_field] = tenant_slug_normalize(self.kwargs[self.lookup_field])
        return super().get_object()

    # Through the services, which validate with the model (a slug is lower case and
    # taken in any case), as the admin and the shell do.
    def perform_create(self, serializer):
        data = serializer.validated_data
        try:
            serializer.instance = tenant_create(
                slug=data["slug"],
                name=data["name"],
                model_ids=[m.public_id for m in data.get("allowed_models", [])],
                contact_email=data.get("contact_email", ""),
                timezone_name=data.get("timezone", "UTC"),
                alert_webhook_url=data.get("alert_webhook_url", ""),
            )
        except DjangoValidationError as exc:
            raise ValidationError(exc.message_dict) from None

    def perform_update(self, serializer):
        data = serializer.validated_data
        models = data.get("allowed_models")
        try:
            tenant_update(
                tenant=serializer.instance,
                slug=data.get("slug"),
                name=data.get("name"),
                contact_email=data.get("contact_email"),
                alert_webhook_url=data.get("alert_webhook_url"),
                timezone_name=data.get("timezone"),
                model_ids=None if models is None else [m.public_id for m in models],
            )
        except DjangoValidationError as exc:
            errors = exc.message_dict
            if "allowed_models" in errors:  # the API calls the field `models`
                errors["models"] = errors.pop("allowed_models")
            raise ValidationError(errors) from None

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

    @extend_schema(request=None, responses={200: WebhookSecretSerializer})
    @action(detail=True, methods=["get"], url_path="webhook-secret")
    def webhook_secret(self, request, slug=None):
        """The secret that signs this tenant's budget alert webhooks."""
        return Response({"secret": webhook_signing_secret(self.get_object())})

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
            except DjangoValidationError as exc:
                return Response({"models": exc.messages}, status=status.HTTP_400_BAD_REQUEST)
        models = sorted(tenant.allowed_models.values_list("public_id", flat=True))
        return Response({"models": models})


class ApiKeyViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.UpdateModelMixin,
    TenantScopedViewSet,
):
    """API keys of the tenants you manage. Creating one returns its secret, once; so does
    rotating one. Name, models, rate limits and expiry can change; the tenant cannot."""

    queryset = (
        ApiKey.objects.select_related("tenant")
        .prefetch_related("allowed_models")
        .order_by("-created_at")
    )
    serializer_class = ApiKeySerializer
    lookup_field = "prefix"
    lookup_value_regex = "[^/]+"

    def get_serializer_class(self):
        if self.action in ("update", "partial_update"):
            return ApiKeyUpdateSerializer
        return ApiKeySerializer

    def get_queryset(self):
        return self.tenant_filter(super().get_queryset())

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
                rpm_limit=data.get("rpm_limit"),
                tpm_limit=data.get("tpm_limit"),
                concurrency_limit=data.get("concurrency_limit"),
            )
        return self._issued_response(issued, status.HTTP_201_CREATED)

    def _issued_response(self, issued, code: int) -> Response:
        issued.key.secret = issued.secret
        body = IssuedApiKeySerializer(issued.key, context=self.get_serializer_context()).data
        response = Response(body, status=code)
        response["Cache-Control"] = "no-store"
        return response

    @extend_schema(request=RotateSerializer, responses={201: IssuedApiKeySerializer})
    @action(detail=True, methods=["post"])
    def rotate(self, request, prefix=None):
        """Issue a replacement key; the old one keeps working for the grace period."""
        key = self.get_object()
        body = RotateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            issued = api_key_rotate(
                key=key, grace=timedelta(seconds=body.validated_data["grace_seconds"])
            )
        except ValueError as exc:  # not usable, or a limit no call fits
            return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
        return self._issued_response(issued, status.HTTP_201_CREATED)

    @extend_schema(request=None, responses=ApiKeySerializer)
    @action(detail=True, methods=["post"])
    def revoke(self, request, prefix=None):
        """Revoke the key: refused from its next request on."""
        key = self.get_object()
        key_revoke(key=key)
        return Response(self.get_serializer(key).data)


class BudgetViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.UpdateModelMixin,
    mixins.DestroyModelMixin,
    TenantScopedViewSet,
):
    """Monthly budgets of the tenants you manage, with this month's counters. Members
    read them; superusers set them (setting a scope's budget again changes it). An update
    changes the budget it names; its tenant and key cannot change."""

    queryset = Budget.objects.select_related("tenant", "api_key").order_by("tenant__slug", "id")
    serializer_class = BudgetSerializer
    permission_classes = [SuperuserWritesMembersRead]

    def perform_create(self, serializer):
        serializer.instance = self._set(serializer.validated_data)

    def perform_update(self, serializer):
        budget = serializer.instance
        data = {
            "limit_usd": budget.limit_usd,
            "hard": budget.hard,
            **serializer.validated_data,
            # The serializer refuses another scope: this is the budget in the URL.
            "tenant": budget.tenant,
            "api_key": budget.api_key,
        }
        serializer.instance = self._set(data)

    def _set(self, data) -> Budget:
        try:
            return budget_set(
                tenant=data["tenant"],
                key=data.get("api_key"),
                limit_usd=data["limit_usd"],
                hard=data.get("hard", True),
                alert_thresholds=data.get("alert_thresholds"),
            )
        except DjangoValidationError as exc:
            raise ValidationError(exc.message_dict) from None
