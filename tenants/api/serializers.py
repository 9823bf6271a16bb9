from __future__ import annotations

from django.core.exceptions import ValidationError as DjangoValidationError
from django.utils import timezone
from rest_framework import serializers

from routing.models import CatalogModel, ServiceURLValidator

from ..budgets import budget_status, usd_str
from ..models import (
    ApiKey,
    Budget,
    Tenant,
    validate_future,
    validate_timezone,
    validate_webhook_url,
)
from ..services import api_key_models_check
from .scoping import VisibleTenantField


class CatalogIdField(serializers.SlugRelatedField):
    def __init__(self, **kwargs):
        kwargs.setdefault("slug_field", "public_id")
        kwargs.setdefault("queryset", CatalogModel.objects.all())
        super().__init__(**kwargs)


class TenantSerializer(serializers.ModelSerializer):
    models = CatalogIdField(
        many=True,
        required=False,
        source="allowed_models",
        help_text="Catalog ids this tenant may call. Empty: nothing.",
    )
    timezone = serializers.CharField(default="UTC", validators=[validate_timezone])
    # DRF's URLField would add its own URL check, which refuses a one-label host.
    alert_webhook_url = serializers.CharField(
        max_length=500,
        required=False,
        allow_blank=True,
        validators=[ServiceURLValidator(), validate_webhook_url],
        help_text=Tenant._meta.get_field("alert_webhook_url").help_text,
    )

    class Meta:
        model = Tenant
        fields = (
            "slug",
            "name",
            "status",
            "contact_email",
            "alert_webhook_url",
            "timezone",
            "models",
            "created_at",
        )
        read_only_fields = ("status", "created_at")


class AllowlistSerializer(serializers.Serializer):
    models = serializers.ListField(child=serializers.CharField(), allow_empty=True)


class ApiKeySerializer(serializers.ModelSerializer):
    tenant = VisibleTenantField()
    models = CatalogIdField(
        many=True,
        required=False,
        source="allowed_models",
        help_text="Narrows the tenant's allowlist for this key; empty means the whole list.",
    )
    state = serializers.SerializerMethodField()
    replaced_by = serializers.SlugRelatedField(slug_field="prefix", read_only=True, allow_null=True)

    class Meta:
        model = ApiKey
        fields = (
            "prefix",
            "tenant",
            "name",
            "models",
            "rpm_limit",
            "tpm_limit",
            "concurrency_limit",
            "state",
            "created_at",
            "expires_at",
            "revoked_at",
            "last_used_at",
            "replaced_by",
        )
        read_only_fields = ("prefix", "created_at", "revoked_at", "last_used_at", "replaced_by")

    def get_state(self, key: ApiKey) -> str:
        if key.revoked_at is not None:
            return "revoked"
        if key.expires_at is not None and key.expires_at <= timezone.now():
            return "expired"
        return "active"

    def validate_expires_at(self, value):
        validate_future(value)
        return value

    def validate(self, data):
        # On update the tenant is the key's own (ApiKeyUpdateSerializer reads it only).
        tenant = data.get("tenant") or getattr(self.instance, "tenant", None)
        if tenant is not None and data.get("allowed_models"):
            try:
                api_key_models_check(tenant=tenant, models=data["allowed_models"])
            except DjangoValidationError as exc:
                raise serializers.ValidationError({"models": exc.messages}) from None
        return data


class IssuedApiKeySerializer(ApiKeySerializer):
    secret = serializers.CharField(
        read_only=True, help_text="The key itself. Shown in this response only, never again."
    )

    class Meta(ApiKeySerializer.Meta):
        fields = (*ApiKeySerializer.Meta.fields, "secret")


class ApiKeyUpdateSerializer(ApiKeySerializer):
    """What may change on an issued key: never its tenant."""

    tenant = serializers.SlugRelatedField(slug_field="slug", read_only=True)


class WebhookSecretSerializer(serializers.Serializer):
    secret = serializers.CharField(read_only=True)


class RotateSerializer(serializers.Serializer):
    grace_seconds = serializers.IntegerField(
        min_value=0,
        max_value=90 * 24 * 3600,
        default=24 * 3600,
        help_text="How long the old key keeps working.",
    )


class BudgetSerializer(serializers.ModelSerializer):
    tenant = VisibleTenantField()
    api_key = serializers.SlugRelatedField(
        slug_field="prefix",
        queryset=ApiKey.objects.all(),
        required=False,
        allow_null=True,
        help_text="Prefix of a key of the tenant; empty for the whole tenant.",
    )
    alert_thresholds = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=1000), required=False
    )
    spent_usd = serializers.SerializerMethodField()
    reserved_usd = serializers.SerializerMethodField()
    remaining_usd = serializers.SerializerMethodField()
    period_start = serializers.SerializerMethodField()
    period_end = serializers.SerializerMethodField()

    class Meta:
        model = Budget
        fields = (
            "id",
            "tenant",
            "api_key",
            "limit_usd",
            "hard",
            "alert_thresholds",
            "spent_usd",
            "reserved_usd",
            "remaining_usd",
            "period_start",
            "period_end",
        )
        # Uniqueness per scope is the service's business (it updates in place).
        validators = []

    def _status(self, budget: Budget):
        cache = self.context.setdefault("_status", {})
        if budget.pk not in cache:
            cache[budget.pk] = budget_status(budget)
        return cache[budget.pk]

    def get_spent_usd(self, budget) -> str:
        return usd_str(self._status(budget).spent)

    def get_reserved_usd(self, budget) -> str:
        return usd_str(self._status(budget).reserved)

    def get_remaining_usd(self, budget) -> str:
        return usd_str(self._status(budget).remaining)

    def get_period_start(self, budget) -> str:
        return self._status(budget).period_start.isoformat()

    def get_period_end(self, budget) -> str:
        return self._status(budget).period_end.isoformat()

    def validate(self, data):
        if self.instance is not None:
            # An update changes the budget it names: its scope (tenant, key) stays, so
            # that no update moves it or writes over the other scope's budget.
            moved = [
                name
                for name in ("tenant", "api_key")
                if name in data and data[name] != getattr(self.instance, name)
            ]
            if moved:
                raise serializers.ValidationError(
                    {name: "A budget's tenant and key cannot change." for name in moved}
                )
        key = data.get("api_key")
        tenant = data.get("tenant") or getattr(self.instance, "tenant", None)
        if key is not None and tenant is not None and key.tenant_id != tenant.pk:
            raise serializers.ValidationError({"api_key": "This key belongs to another tenant."})
        if data.get("limit_usd") is not None and data["limit_usd"] <= 0:
            raise serializers.ValidationError({"limit_usd": "Must be positive."})
        return data
