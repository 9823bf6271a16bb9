from django.apps import AppConfig


class TenantsConfig(AppConfig):
    name = "tenants"
    verbose_name = "Tenants and keys"

    def ready(self) -> None:
        from django.db.models.signals import m2m_changed, post_delete

        from . import schema  # noqa: F401  (registers the OpenAPI auth description)
        from .models import ApiKey, Tenant
        from .selectors import allowlist_cache_clear

        for through in (Tenant.allowed_models.through, ApiKey.allowed_models.through):
            m2m_changed.connect(
                allowlist_cache_clear, sender=through, dispatch_uid=f"allowlist-{through.__name__}"
            )
        post_delete.connect(
            allowlist_cache_clear, sender=Tenant, dispatch_uid="allowlist-tenant-delete"
        )
