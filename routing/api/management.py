"""Routes in the management API: read by every staff user, written by superusers, and
explained as a dry run (`POST /api/routes/{name}/explain`) without calling anything."""

from __future__ import annotations

import uuid

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import permissions, serializers, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.response import Response

from tenants.budgets import budget_skip_reason, budget_status
from tenants.models import ApiKey, Budget, tenant_slug_normalize
from tenants.selectors import model_for_key, tenant_allows, tenants_visible_to

from ..errors import GatewayError
from ..models import CatalogModel, Route, RouteTarget
from ..proxy import no_target_error, route_plan_for, target_cost_bound
from ..routes import (
    ROUTE_NAME,
    TargetDraft,
    request_features,
    route_name_validate,
    route_targets_validate,
    routes_all,
)
from ..validation import chat_request_validate


class SuperuserWrites(permissions.IsAuthenticated):
    message = "Only superusers may change routes."

    def has_permission(self, request, view) -> bool:
        if not super().has_permission(request, view):
            return False
        if request.method in permissions.SAFE_METHODS or getattr(view, "action", "") == "explain":
            return True
        return request.user.is_superuser


class RouteTargetSerializer(serializers.ModelSerializer):
    model = serializers.SlugRelatedField(
        slug_field="public_id",
        queryset=CatalogModel.objects.all(),
        required=False,
        allow_null=True,
        help_text="A catalog id; or give `route` instead.",
    )
    route = serializers.SlugRelatedField(
        source="subroute",
        slug_field="name",
        queryset=Route.objects.all(),
        required=False,
        allow_null=True,
        help_text="Another route's name; or give `model` instead.",
    )

    class Meta:
        model = RouteTarget
        fields = (
            "model",
            "route",
            "timeout_seconds",
            "weight",
            "when_image",
            "when_reasoning",
            "min_prompt_tokens",
            "max_prompt_chars",
        )


class RouteSerializer(serializers.ModelSerializer):
    targets = RouteTargetSerializer(many=True, help_text="In order: position is list order.")

    class Meta:
        model = Route
        fields = (
            "name",
            "description",
            "strategy",
            "enabled",
            "targets",
            "created_at",
            "updated_at",
        )
        read_only_fields = ("created_at", "updated_at")
        extra_kwargs = {"name": {"validators": []}}  # uniqueness checked below, with the rest

    def validate_name(self, name: str) -> str:
        try:
            route_name_validate(name)
        except DjangoValidationError as exc:
            raise ValidationError(exc.message_dict["name"]) from None
        taken = Route.objects.filter(name=name)
        if self.instance is not None:
            taken = taken.exclude(pk=self.instance.pk)
        if taken.exists():
            raise ValidationError("A route with this name already exists.")
        return name

    def validate(self, attrs: dict) -> dict:
        targets = attrs.get("targets")
        if targets is not None:
            drafts = [
                TargetDraft(
                    model=t.get("model"),
                    subroute=t.get("subroute"),
                    weight=t.get("weight", 1),
                    timeout_seconds=t.get("timeout_seconds"),
                )
                for t in targets
            ]
            try:
                route_targets_validate(self.instance or Route(), drafts)
            except DjangoValidationError as exc:
                raise ValidationError({"targets": exc.messages}) from None
        return attrs

    @transaction.atomic
    def create(self, validated_data: dict) -> Route:
        targets = validated_data.pop("targets")
        route = Route.objects.create(**validated_data)
        self._targets_replace(route, targets)
        return route

    @transaction.atomic
    def update(self, instance: Route, validated_data: dict) -> Route:
        targets = validated_data.pop("targets", None)
        for field, value in validated_data.items():
            setattr(instance, field, value)
        instance.save()
        if targets is not None:
            self._targets_replace(instance, targets)
        return instance

    @staticmethod
    def _targets_replace(route: Route, targets: list[dict]) -> None:
        route.targets.all().delete()
        for position, target in enumerate(targets):
            RouteTarget.objects.create(route=route, position=position, **target)


class ExplainSerializer(serializers.Serializer):
    """The answer of a dry run."""

    route = serializers.CharField()
    strategy = serializers.CharField()
    as_ = serializers.DictField(help_text="The tenant and key explained for.")
    split_key = serializers.CharField()
    request = serializers.DictField(help_text="What the rules look at in the request.")
    chosen = serializers.CharField(allow_null=True, help_text="The model tried first.")
    attempts = serializers.ListField(
        child=serializers.DictField(), help_text="The models that would be tried, in order."
    )
    skipped = serializers.ListField(
        child=serializers.DictField(), help_text="Targets left out, each with its reason."
    )
    steps = serializers.ListField(child=serializers.CharField(), help_text="How it was decided.")
    error = serializers.CharField(allow_null=True, help_text="What a client would get instead.")

    def get_fields(self):
        fields = super().get_fields()
        fields["as"] = fields.pop("as_")
        return fields


class RouteViewSet(viewsets.ModelViewSet):
    """Routes: names keys call like models. Everyone reads; superusers write."""

    queryset = Route.objects.prefetch_related("targets__model", "targets__subroute")
    serializer_class = RouteSerializer
    permission_classes = [SuperuserWrites]
    lookup_field = "name"
    lookup_value_regex = ROUTE_NAME.pattern.strip("^$")

    def perform_destroy(self, instance: Route) -> None:
        users = sorted(instance.used_by.values_list("route__name", flat=True))
        if users:
            raise ValidationError(
                {"detail": f"The route is a target of: {', '.join(users)}. Remove it there first."}
            )
        instance.delete()

    @extend_schema(
        request=dict,
        responses=ExplainSerializer,
        parameters=[
            OpenApiParameter("key", str, description="Explain as this API key (its prefix)."),
            OpenApiParameter(
                "tenant", str, description="Explain as this tenant (its slug, in any case)."
            ),
            OpenApiParameter("request_id", str, description="The split key (default: random)."),
        ],
    )
    @action(detail=True, methods=["post"])
    def explain(self, request, name: str):
        """Which target a chat completion request would be served by, and why. Calls
        nothing, holds nothing. The body is the request a client would send."""
        route = self.get_object()
        body = request.data if isinstance(request.data, dict) else None
        if body is None:
            raise ValidationError({"detail": "Send the chat completion request as a JSON object."})
        body = {**body, "model": route.name}
        try:
            chat_request_validate(body)
        except GatewayError as exc:
            raise ValidationError({exc.param or "detail": exc.message}) from None
        key, tenant = self._who(request)
        split_key = request.query_params.get("request_id") or f"req_{uuid.uuid4().hex}"
        return Response(route_explain(route, body, key=key, tenant=tenant, split_key=split_key))

    def _who(self, request):
        visible = tenants_visible_to(request.user)
        prefix = request.query_params.get("key")
        if prefix:
            key = (
                ApiKey.objects.filter(prefix=prefix, tenant__in=visible)
                .select_related("tenant")
                .first()
            )
            if key is None:
                raise NotFound("No such API key.")
            return key, key.tenant
        slug = request.query_params.get("tenant")
        if slug:
            tenant = visible.filter(slug=tenant_slug_normalize(slug)).first()
            if tenant is None:
                raise NotFound("No such tenant.")
            return None, tenant
        if not request.user.is_superuser:
            raise ValidationError({"tenant": "Say which tenant (or key) to explain for."})
        return None, None


def route_explain(route: Route, body: dict, *, key, tenant, split_key: str) -> dict:
    """The dry run: the plan of `route` for `body` as `key` (or `tenant`, or the catalog
    alone), with the budget's say, as the explain endpoint answers it."""
    features = request_features(body)
    answer = {
        "route": route.name,
        "strategy": route.strategy,
        "as": {
            "tenant": tenant.slug if tenant else None,
            "key": key.prefix if key else None,
        },
        "split_key": split_key,
        "request": {
            "has_image": features.has_image,
            "asks_for_reasoning": features.wants_reasoning,
            "prompt_characters": features.prompt_chars,
            "prompt_tokens_estimate": features.prompt_tokens,
        },
        "chosen": None,
        "attempts": [],
        "skipped": [],
        "steps": [],
        "error": None,
    }
    routes = routes_all(fresh=True)
    if route.name not in routes:
        answer["error"] = f"The route '{route.name}' is disabled: calls to it get a 404."
        return answer
    if key is not None:
        tenant_id = key.tenant_id
        allows = lambda public_id: model_for_key(key=key, public_id=public_id)[1]  # noqa: E731
    elif tenant is not None:
        tenant_id = tenant.pk
        allows = lambda public_id: tenant_allows(tenant_id=tenant.pk, public_id=public_id)  # noqa: E731
    else:
        tenant_id = None
        allows = lambda public_id: True  # noqa: E731
        answer["steps"].append("No tenant or key given: allowlists and budgets not checked.")
    plan, targets = route_plan_for(
        spec=routes[route.name],
        routes=routes,
        body=body,
        at=timezone.now(),
        split_key=split_key,
        tenant_id=tenant_id,
        allows=allows,
    )
    answer["steps"].extend(plan.steps)
    skipped = list(plan.skipped)
    tightest = _budget_tightest(key, tenant)
    for target, candidate in zip(targets, plan.candidates, strict=True):
        bound = target_cost_bound(body, target.model, target.units)
        if tightest is not None and bound > tightest.remaining:
            reason = budget_skip_reason(
                bound,
                budget=tightest.budget,
                remaining=tightest.remaining,
                ends_at=tightest.period_end,
            )
            skipped.append((target.model.public_id, reason))
            continue
        timeout = target.timeout or target.model.provider.timeout_seconds
        answer["attempts"].append(
            {
                "model": target.model.public_id,
                "provider": target.model.provider.name,
                "timeout_seconds": timeout,
                "via": list(candidate.via),
                "worst_case_cost_usd": str(bound),
            }
        )
    answer["skipped"] = [{"model": m, "reason": why} for m, why in skipped]
    if answer["attempts"]:
        answer["chosen"] = answer["attempts"][0]["model"]
    else:
        answer["error"] = no_target_error(route.name, skipped).message
    return answer


def _budget_tightest(key, tenant):
    """The status of the hard budget over the call with the least left this month, or
    None."""
    if tenant is None:
        return None
    budgets = Budget.objects.filter(tenant=tenant, api_key__isnull=True, hard=True)
    if key is not None:
        budgets = budgets | Budget.objects.filter(api_key=key, hard=True)
    statuses = [
        budget_status(b, tz_name=tenant.timezone) for b in budgets.select_related("api_key")
    ]
    return min(statuses, key=lambda status: status.remaining, default=None)
