from django.apps import AppConfig


class BillingConfig(AppConfig):
    name = "billing"
    verbose_name = "Billing: usage ledger, prices and invoices"

    def ready(self) -> None:
        from django.db.models.signals import post_delete, post_save

        from .models import TenantPrice
        from .pricing import tenant_price_cache_clear

        for signal, name in ((post_save, "save"), (post_delete, "delete")):
            signal.connect(
                tenant_price_cache_clear, sender=TenantPrice, dispatch_uid=f"tenant-price-{name}"
            )
