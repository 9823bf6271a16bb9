"""Reads for tenants and keys: which models a key may use, which tenants a user sees."""

from __future__ import annotations

from functools import cache

from django.db import connection
from django.db.models import QuerySet

from config.db import fetch_one, model_from_row
from routing.config_cache import ConfigCache
from routing.models import CatalogModel
from routing.routes import RouteSpec, route_models, routes_all
from routing.selectors import CatalogEntry, catalog_entry

from .models import ApiKey, Tenant

_TenantModels = Tenant.allowed_models.through
_KeyModels = ApiKey.allowed_models.through


@cache
def _api_key_sql() -> str:
    quote = connection.ops.quote_name
    key_columns = ", ".join(f"k.{quote(f.column)}" for f in ApiKey._meta.concrete_fields)
    # Built from model metadata only; the digest travels as a parameter.
    return (
        f"SELECT {key_columns}, t.{quote('status')} AS tenant_status, "  # noqa: S608
        f"t.{quote('timezone')} AS tenant_timezone, "
        f"t.{quote('budget_version')} AS tenant_budget_version "
        f"FROM {quote(ApiKey._meta.db_table)} k "
        f"JOIN {quote(Tenant._meta.db_table)} t ON t.{quote('id')} = k.{quote('tenant_id')} "
        f"WHERE k.{quote('digest')} = %s"
    )


def api_key_for_digest(digest: str) -> ApiKey | None:
    """The key with this digest, with its tenant's status, time zone and budget version
    as `key.tenant_status`, `key.tenant_timezone` and `key.tenant_budget_version`.

    Runs on every request and must see revocations at once, so it is not cached; written
    as one plain, prepared statement (config.db) because building the equivalent ORM
    query costs three times more CPU than running it.
    """
    row = fetch_one(_api_key_sql(), [digest])
    if row is None:
        return None
    fields = len(ApiKey._meta.concrete_fields)
    key = model_from_row(ApiKey, row[:fields])
    key.tenant_status, key.tenant_timezone, key.tenant_budget_version = row[fields:]
    return key


_allowlists = ConfigCache(maxsize=100_000)


def _tenant_model_ids(tenant_id: int) -> frozenset[int]:
    return _allowlists.get_or_load(
        ("tenant", tenant_id),
        lambda: frozenset(
            _TenantModels.objects.filter(tenant_id=tenant_id).values_list(
                "catalogmodel_id", flat=True
            )
        ),
    )


def _key_model_ids(key_id: int) -> frozenset[int]:
    """The key's own narrowing list; empty when the key is not narrowed."""
    return _allowlists.get_or_load(
        ("key", key_id),
        lambda: frozenset(
            _KeyModels.objects.filter(apikey_id=key_id).values_list("catalogmodel_id", flat=True)
        ),
    )


def _allows(key: ApiKey, model_id: int) -> bool:
    if model_id not in _tenant_model_ids(key.tenant_id):
        return False
    narrowed = _key_model_ids(key.pk)
    return not narrowed or model_id in narrowed


def tenant_allows(*, tenant_id: int, public_id: str) -> bool:
    """Whether the tenant's allowlist holds this enabled catalog model."""
    entry = catalog_entry(public_id)
    return entry is not None and entry.model.pk in _tenant_model_ids(tenant_id)


def allowlist_cache_clear(**kwargs) -> None:
    """Drop this process's cached allowlists (connected to the m2m_changed signals)."""
    _allowlists.clear()


def model_for_key(*, key: ApiKey, public_id: str) -> tuple[CatalogEntry | None, bool]:
    """(catalog entry, allowed) for a public id. The entry is None when the catalog has no
    enabled model by that id. Read from the per-process configuration caches."""
    entry = catalog_entry(public_id)
    if entry is None:
        return None, False
    return entry, _allows(key, entry.model.pk)


def models_for_key(*, key: ApiKey) -> list[CatalogModel]:
    """Enabled catalog models in the tenant's allowlist, narrowed by the key's own list."""
    candidates = CatalogModel.objects.filter(
        enabled=True, pk__in=_tenant_model_ids(key.tenant_id)
    ).order_by("public_id")
    return [m for m in candidates if _allows(key, m.pk)]


def routes_for_key(*, key: ApiKey) -> list[RouteSpec]:
    """Enabled routes that reach at least one model the key may use, by name."""
    routes = routes_all()
    usable = []
    for spec in routes.values():
        if catalog_entry(spec.name) is not None:
            continue  # a model took the name since: calls reach the model
        for public_id in route_models(spec, routes):
            entry, allowed = model_for_key(key=key, public_id=public_id)
            if entry is not None and allowed:
                usable.append(spec)
                break
    return sorted(usable, key=lambda spec: spec.name)


def tenants_visible_to(user) -> QuerySet[Tenant]:
    """The one place that decides which tenants a management API user may see."""
    if user is None or not user.is_authenticated or not user.is_active:
        return Tenant.objects.none()
    if user.is_superuser:
        return Tenant.objects.all()
    return Tenant.objects.filter(members=user)
