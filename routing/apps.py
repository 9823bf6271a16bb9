from django.apps import AppConfig


class RoutingConfig(AppConfig):
    name = "routing"
    verbose_name = "Routing: providers, catalog and prices"

    def ready(self) -> None:
        from django.db.models.signals import post_delete, post_save

        from . import checks  # noqa: F401  (registers the catalog system checks)
        from .models import CatalogModel, ModelPrice, Provider, Route, RouteTarget
        from .routes import routes_cache_clear
        from .selectors import catalog_cache_clear

        for model in (CatalogModel, ModelPrice, Provider):
            post_save.connect(
                catalog_cache_clear, sender=model, dispatch_uid=f"catalog-save-{model.__name__}"
            )
            post_delete.connect(
                catalog_cache_clear, sender=model, dispatch_uid=f"catalog-delete-{model.__name__}"
            )
        for model in (Route, RouteTarget, CatalogModel):
            post_save.connect(
                routes_cache_clear, sender=model, dispatch_uid=f"routes-save-{model.__name__}"
            )
            post_delete.connect(
                routes_cache_clear, sender=model, dispatch_uid=f"routes-delete-{model.__name__}"
            )
