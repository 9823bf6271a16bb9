from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import CommandError

from config.command_errors import validation_command_error
from config.commands import ScriptedCommand
from tenants.services import staff_token_issue


class Command(ScriptedCommand):
    help = "Issue a management API token for an active staff user; prints the secret alone, once."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="", help="Up to 200 characters.")

    def handle(self, *args, username, name, **options):
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"No user {username!r}.")
        try:
            issued = staff_token_issue(user=user, name=name)
        except ValidationError as exc:
            raise validation_command_error(exc, {"name": "--name", "user": ""}) from None
        self.stderr.write(f"Issued staff token {issued.key.prefix}… for {username}.")
        self.stdout.write(issued.secret)
