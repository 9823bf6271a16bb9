"""Reads for tenants and keys: which models a key may use, which tenants a user sees."""

from __future__ import annotations

from django.db.models import Exists, OuterRef, QuerySet

from routing.models import CatalogModel

from .models import ApiKey, Tenant

_TenantModels = Tenant.allowed_models.through
_KeyModels = ApiKey.allowed_models.through


def models_for_key(*, key: ApiKey) -> QuerySet[CatalogModel]:
    """Enabled catalog models in the tenant's allowlist, narrowed by the key's own list."""
    models = CatalogModel.objects.filter(enabled=True, tenants=key.tenant_id)
    if _KeyModels.objects.filter(apikey_id=key.pk).exists():
        models = models.filter(
            Exists(_KeyModels.objects.filter(apikey_id=key.pk, catalogmodel_id=OuterRef("pk")))
        )
    return models.order_by("public_id")


def model_for_key(*, key: ApiKey, public_id: str) -> tuple[CatalogModel | None, bool]:
    """(model, allowed) for a public id, in one query. model is None when the catalog has
    no enabled model by that id."""
    model = (
        CatalogModel.objects.filter(public_id=public_id, enabled=True)
        .select_related("provider")
        .annotate(
            tenant_allows=Exists(
                _TenantModels.objects.filter(
                    tenant_id=key.tenant_id, catalogmodel_id=OuterRef("pk")
                )
            ),
            key_narrows=Exists(_KeyModels.objects.filter(apikey_id=key.pk)),
            key_allows=Exists(
                _KeyModels.objects.filter(apikey_id=key.pk, catalogmodel_id=OuterRef("pk"))
            ),
        )
        .first()
    )
    if model is None:
        return None, False
    allowed = model.tenant_allows and (model.key_allows or not model.key_narrows)
    return model, allowed


def tenants_visible_to(user) -> QuerySet[Tenant]:
    """The one place that decides which tenants a management API user may see."""
    if user is None or not user.is_authenticated or not user.is_active:
        return Tenant.objects.none()
    if user.is_superuser:
        return Tenant.objects.all()
    return Tenant.objects.filter(members=user)
