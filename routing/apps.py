from django.apps import AppConfig


class RoutingConfig(AppConfig):
    name = "routing"
    verbose_name = "Routing: providers, catalog and prices"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the catalog system checks)
