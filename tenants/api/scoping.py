"""Tenant scoping for the management API, enforced in one place.

Every viewset over tenant-owned data inherits `TenantScopedViewSet` and names the path
from its model to the tenant; the base narrows every queryset to the tenants the user may
see (`tenants.selectors.tenants_visible_to`), so no endpoint can forget it. Objects of
other tenants are then simply not found (404), never forbidden (which would confirm
they exist).
"""

from __future__ import annotations

from rest_framework import permissions, relations, viewsets

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


class VisibleTenantField(relations.SlugRelatedField):
    """A tenant named by slug, chosen among those the requesting user may see."""

    def __init__(self, **kwargs):
        kwargs.setdefault("slug_field", "slug")
        super().__init__(**kwargs)

    def get_queryset(self):
        request = self.context.get("request")
        return tenants_visible_to(request.user if request else None)


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
