from django.core.management.base import BaseCommand, CommandError

from tenants.models import ApiKey
from tenants.services import key_revoke


class Command(BaseCommand):
    help = "Revoke an API key by its display prefix (e.g. tg-AbCd1234)."

    def add_arguments(self, parser):
        parser.add_argument("prefix")

    def handle(self, *args, prefix, **options):
        key = ApiKey.objects.filter(prefix=prefix.rstrip("…")).first()
        if key is None:
            raise CommandError(f"No API key with prefix {prefix!r}.")
        if key.revoked_at is not None:
            self.stdout.write(
                f"Key {key.prefix}… was already revoked at {key.revoked_at:%Y-%m-%d %H:%M:%S}."
            )
            return
        key_revoke(key=key)
        self.stdout.write(f"Revoked key {key.prefix}… of tenant {key.tenant.slug}.")
