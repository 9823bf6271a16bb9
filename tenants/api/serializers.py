from __future__ import annotations

from django.utils import timezone
from rest_framework import serializers

from routing.models import CatalogModel

from ..models import ApiKey, Tenant, validate_timezone
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

    class Meta:
        model = Tenant
        fields = ("slug", "name", "status", "contact_email", "timezone", "models", "created_at")
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

    class Meta:
        model = ApiKey
        fields = (
            "prefix",
            "tenant",
            "name",
            "models",
            "state",
            "created_at",
            "expires_at",
            "revoked_at",
            "last_used_at",
        )
        read_only_fields = ("prefix", "created_at", "revoked_at", "last_used_at")

    def get_state(self, key: ApiKey) -> str:
        if key.revoked_at is not None:
            return "revoked"
        if key.expires_at is not None and key.expires_at <= timezone.now():
            return "expired"
        return "active"

    def validate_expires_at(self, value):
        if value is not None and value <= timezone.now():
            raise serializers.ValidationError("Must be in the future.")
        return value


class IssuedApiKeySerializer(ApiKeySerializer):
    secret = serializers.CharField(
        read_only=True, help_text="The key itself. Shown in this response only, never again."
    )

    class Meta(ApiKeySerializer.Meta):
        fields = (*ApiKeySerializer.Meta.fields, "secret")
