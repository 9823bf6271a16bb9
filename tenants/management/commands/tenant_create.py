from django.core.exceptions import ValidationError
from django.core.management.base import CommandError

from config.command_errors import validation_command_error
from config.commands import ScriptedCommand
from tenants.models import Tenant, tenant_slug_normalize
from tenants.services import UnknownModelsError, tenant_create, tenant_update


def _models(count: int) -> str:
    return f"{count} model{'' if count == 1 else 's'}"


# Which option each field's message is about ("" where the message says it itself).
OPTIONS = {
    "slug": "SLUG",
    "name": "--name",
    "contact_email": "--email",
    "timezone": "--timezone",
    "allowed_models": "",
}


class Command(ScriptedCommand):
    help = (
        "Create a tenant with its model allowlist. If the slug exists, update that tenant "
        "instead: only the options given change, and its allowlist only with --models."
    )

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("--name", default=None, help="Display name (needed to create).")
        parser.add_argument(
            "--models",
            default=None,
            help="Comma-separated catalog ids the tenant may call: the whole list, replacing "
            "the current one ('' empties it). Left as it is when not given.",
        )
        parser.add_argument("--email", default=None, help="Contact email.")
        parser.add_argument(
            "--timezone", default=None, help="IANA zone for its billing month (a new tenant: UTC)."
        )

    def handle(self, *args, slug, name, models, email, timezone, **options):
        model_ids = None if models is None else [m for m in models.split(",") if m.strip()]
        existing = Tenant.objects.filter(slug=tenant_slug_normalize(slug)).first()
        try:
            if existing is not None:
                self._update(existing, name, email, timezone, model_ids)
                return
            if name is None:
                raise CommandError(f"No tenant {slug!r} yet: --name is needed to create it.")
            tenant = tenant_create(
                slug=slug,
                name=name,
                model_ids=model_ids,
                contact_email=email or "",
                timezone_name=timezone or "UTC",
            )
        except UnknownModelsError as exc:
            raise CommandError(str(exc)) from None
        except ValidationError as exc:
            raise validation_command_error(exc, OPTIONS) from None
        count = len(model_ids or [])
        self.stdout.write(f"Created tenant {tenant.slug} with {count} allowed models.")

    def _update(self, tenant, name, email, timezone, model_ids) -> None:
        before = tenant.allowed_models.count()
        changed = tenant_update(
            tenant=tenant,
            name=name,
            contact_email=email,
            timezone_name=timezone,
            model_ids=model_ids,
        )
        fields = [f for f in changed if f != "allowed_models"]
        if model_ids is None:
            allowlist = f"allowlist left as it is ({_models(before)})"
        elif "allowed_models" in changed:
            after = tenant.allowed_models.count()
            allowlist = f"allowlist set to {_models(after)} (was {before})"
            if after == 0:
                allowlist += ": its keys can call nothing"
        else:
            allowlist = f"allowlist unchanged ({_models(before)})"
        if not fields and "allowed_models" not in changed:
            self.stdout.write(f"Tenant {tenant.slug} unchanged; {allowlist}.")
        elif fields:
            self.stdout.write(f"Updated tenant {tenant.slug}: {', '.join(fields)}; {allowlist}.")
        else:
            self.stdout.write(f"Updated tenant {tenant.slug}: {allowlist}.")
