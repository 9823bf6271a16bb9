"""Tenant scoping for the management API, enforced in one place.

Every viewset over tenant-owned data inherits `TenantScopedViewSet` and names the path
from its model to the tenant; the base narrows every queryset to the tenants the user may
see (`tenants.selectors.tenants_visible_to`), so no endpoint can forget it. Objects of
other tenants are then simply not found (404), never forbidden (which would confirm
they exist).

A tenant is named by its slug in any case (slugs are stored lower case): in a body
(`VisibleTenantField`), in a URL (`TenantViewSet`) and in the `?tenant=` filter
(`tenant_filter`), all through `tenants.models.tenant_slug_normalize`, and always among
the tenants the user may see.
"""

from __future__ import annotations

from rest_framework import permissions, relations, viewsets

from ..models import tenant_slug_normalize
from ..selectors import tenants_visible_to


class TenantScopedViewSet(viewsets.GenericViewSet):
    # Path from the model to its Tenant; "" when the model is Tenant itself.
    tenant_field: str = "tenant"

    def get_queryset(self):
        queryset = super().get_queryset()
        visible = tenants_visible_to(self.request.user)
        if not self.tenant_field:
            return queryset.filter(pk__in=visible.values("pk"))
        return queryset.filter(**{f"{self.tenant_field}__in": visible.values("pk")})

    def tenant_filter(self, queryset):
        """`queryset` narrowed to the tenant the `tenant` query parameter names, in any
        case. Applied to a scoped queryset, so a tenant the user may not see gives nothing,
        as a slug no tenant has does (and as any filter value nothing matches)."""
        slug = self.request.query_params.get("tenant")
        if not slug:
            return queryset
        field = f"{self.tenant_field}__slug" if self.tenant_field else "slug"
        return queryset.filter(**{field: tenant_slug_normalize(slug)})


class VisibleTenantField(relations.SlugRelatedField):
    """A tenant named by slug, in any case, chosen among those the requesting user may see."""

    def __init__(self, **kwargs):
        kwargs.setdefault("slug_field", "slug")
        super().__init__(**kwargs)

    def get_queryset(self):
        request = self.context.get("request")
        return tenants_visible_to(request.user if request else None)

    def to_internal_value(self, data):
        return super().to_internal_value(
            tenant_slug_normalize(data) if isinstance(data, str) else data
        )


class IsSuperuser(permissions.IsAuthenticated):
    message = "Only superusers may do this."

    def has_permission(self, request, view) -> bool:
        return super().has_permission(request, view) and request.user.is_superuser


class SuperuserWritesMembersRead(permissions.IsAuthenticated):
    """Members of a tenant read what the view holds; only superusers write it.

    The refusal names what was refused: the view's `superuser_writes` when it has one
    ("build, finalize, void, correct or mark paid invoices"), else "change" and its
    model's plural name ("Only superusers may change budgets.")."""

    message = "Only superusers may change this."

    def has_permission(self, request, view) -> bool:
        if not super().has_permission(request, view):
            return False
        if request.method in permissions.SAFE_METHODS or request.user.is_superuser:
            return True
        self.message = f"Only superusers may {self._writes(view)}."  # one instance a request
        return False

    @staticmethod
    def _writes(view) -> str:
        writes = getattr(view, "superuser_writes", "")
        queryset = getattr(view, "queryset", None)
        if writes or queryset is None:
            return writes or "change this"
        return f"change {queryset.model._meta.verbose_name_plural}"
