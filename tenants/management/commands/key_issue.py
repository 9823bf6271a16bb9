from datetime import timedelta

from django.core.exceptions import ValidationError
from django.core.management.base import CommandError
from django.utils import timezone

from config.command_errors import validation_command_error
from config.commands import ScriptedCommand
from tenants.models import Tenant, tenant_slug_normalize
from tenants.services import UnknownModelsError, api_key_issue

OPTIONS = {"name": "--name", "expires_at": "--expires-in-days", "allowed_models": "--models"}


class Command(ScriptedCommand):
    help = "Issue an API key for a tenant; prints the secret alone on standard output, once."

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("--name", default="", help="Up to 200 characters.")
        parser.add_argument("--expires-in-days", type=int, default=None)
        parser.add_argument(
            "--models", default="", help="Comma-separated ids narrowing the tenant's allowlist."
        )

    def handle(self, *args, slug, name, expires_in_days, models, **options):
        tenant = Tenant.objects.filter(slug=tenant_slug_normalize(slug)).first()
        if tenant is None:
            raise CommandError(f"No tenant with slug {slug!r}.")
        expires_at = None
        if expires_in_days is not None:
            if expires_in_days < 1:
                raise CommandError("--expires-in-days must be at least 1.")
            try:
                expires_at = timezone.now() + timedelta(days=expires_in_days)
            except OverflowError:
                raise CommandError(
                    f"--expires-in-days {expires_in_days} is too many: "
                    "the date would fall after the year 9999."
                ) from None
        try:
            issued = api_key_issue(
                tenant=tenant,
                name=name,
                expires_at=expires_at,
                model_ids=[m for m in models.split(",") if m.strip()],
            )
        except UnknownModelsError as exc:
            raise CommandError(str(exc)) from None
        except ValidationError as exc:
            raise validation_command_error(exc, OPTIONS) from None
        self.stderr.write(f"Issued key {issued.key.prefix}… for {slug}; it is shown only now.")
        self.stdout.write(issued.secret)
