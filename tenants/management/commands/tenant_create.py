from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from tenants.models import Tenant
from tenants.services import UnknownModelsError, tenant_allowlist_set, tenant_create


class Command(BaseCommand):
    help = "Create a tenant with its model allowlist (or update the allowlist if it exists)."

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("--name", required=True)
        parser.add_argument(
            "--models", default="", help="Comma-separated catalog ids the tenant may call."
        )
        parser.add_argument("--email", default="", help="Contact email.")
        parser.add_argument("--timezone", default="UTC", help="IANA zone for its billing month.")

    def handle(self, *args, slug, name, models, email, timezone, **options):
        model_ids = [m for m in models.split(",") if m.strip()]
        try:
            existing = Tenant.objects.filter(slug=slug).first()
            if existing is not None:
                tenant_allowlist_set(tenant=existing, model_ids=model_ids)
                self.stdout.write(
                    f"Tenant {slug} exists; allowlist set to {len(model_ids)} models."
                )
                return
            tenant = tenant_create(
                slug=slug,
                name=name,
                model_ids=model_ids,
                contact_email=email,
                timezone_name=timezone,
            )
        except UnknownModelsError as exc:
            raise CommandError(str(exc)) from None
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        self.stdout.write(f"Created tenant {tenant.slug} with {len(model_ids)} allowed models.")
