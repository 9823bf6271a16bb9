from __future__ import annotations

from rest_framework import serializers

from ..models import UsageEvent


class UsageEventSerializer(serializers.ModelSerializer):
    tenant = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    api_key = serializers.SlugRelatedField(slug_field="prefix", read_only=True)
    served_model = serializers.SlugRelatedField(slug_field="public_id", read_only=True)
    provider = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta:
        model = UsageEvent
        fields = (
            "id",
            "request_id",
            "occurred_at",
            "tenant",
            "api_key",
            "requested_model",
            "served_model",
            "provider",
            "price",
            "status",
            "usage_source",
            "streamed",
            "input_uncached_tokens",
            "input_cached_tokens",
            "output_tokens",
            "reasoning_tokens",
            "unpriced_tokens",
            "cost",
            "latency_ms",
            "ttft_ms",
            "upstream_status",
            "error_code",
            "raw_usage",
        )
        read_only_fields = fields
