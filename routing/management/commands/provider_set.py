from django.core.exceptions import ValidationError
from django.core.management.base import CommandError

from config.command_errors import validation_command_error
from config.commands import ScriptedCommand
from routing.models import MAX_TIMEOUT_SECONDS
from routing.services import provider_set


class Command(ScriptedCommand):
    help = "Create or update an upstream provider. The API key stays in the environment."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument(
            "--base-url", required=True, help="http(s)://..., ending in /v1; no credentials."
        )
        parser.add_argument(
            "--api-key-env",
            default=None,
            help="Name of the environment variable holding the key, e.g. DEEPSEEK_API_KEY "
            "(never the key itself; '' for none).",
        )
        parser.add_argument("--timeout", type=float, default=None, help="Seconds.")

    def handle(self, *args, name, base_url, api_key_env, timeout, **options):
        if timeout is not None and not 0 < timeout <= MAX_TIMEOUT_SECONDS:
            raise CommandError(
                f"--timeout must be more than 0 and at most {MAX_TIMEOUT_SECONDS:g} seconds."
            )
        try:
            provider, created = provider_set(
                name=name, base_url=base_url, api_key_env=api_key_env, timeout_seconds=timeout
            )
        except ValidationError as exc:
            raise validation_command_error(
                exc,
                {
                    "name": "NAME",
                    "base_url": "--base-url",
                    "api_key_env": "",
                    "timeout_seconds": "--timeout",
                },
            ) from None
        verb = "Created" if created else "Updated"
        self.stdout.write(f"{verb} provider {provider.name}: {provider.base_url}")
