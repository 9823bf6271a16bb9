from django.apps import AppConfig


class TenantsConfig(AppConfig):
    name = "tenants"
    verbose_name = "Tenants and keys"

    def ready(self) -> None:
        from django.db.models.signals import m2m_changed, post_delete, post_save

        from . import schema  # noqa: F401  (registers the OpenAPI auth description)
        from .budgets import budget_version_bump
        from .models import ApiKey, Budget, Tenant
        from .selectors import allowlist_cache_clear

        # Saves clear this process's configuration snapshots at once (others: on expiry).
        for through in (Tenant.allowed_models.through, ApiKey.allowed_models.through):
            m2m_changed.connect(
                allowlist_cache_clear, sender=through, dispatch_uid=f"allowlist-{through.__name__}"
            )
        post_delete.connect(
            allowlist_cache_clear, sender=Tenant, dispatch_uid="allowlist-tenant-delete"
        )
        for signal, name in ((post_save, "save"), (post_delete, "delete")):
            signal.connect(budget_version_bump, sender=Budget, dispatch_uid=f"budgets-{name}")
