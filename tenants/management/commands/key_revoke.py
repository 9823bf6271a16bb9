from django.core.management.base import CommandError

from config.commands import ScriptedCommand
from tenants.services import api_key_named, key_revoke


class Command(ScriptedCommand):
    help = "Revoke an API key by its display prefix (e.g. tg-AbCd1234) or its whole secret."

    def add_arguments(self, parser):
        parser.add_argument("prefix", help="The key's display prefix, or the leaked secret.")

    def handle(self, *args, prefix, **options):
        key, shown = api_key_named(prefix)
        if key is None:
            raise CommandError(f"No API key {shown!r}.")
        if key.revoked_at is not None:
            self.stdout.write(
                f"Key {key.prefix}… was already revoked at {key.revoked_at:%Y-%m-%d %H:%M:%S}."
            )
            return
        key_revoke(key=key)
        self.stdout.write(f"Revoked key {key.prefix}… of tenant {key.tenant.slug}.")
