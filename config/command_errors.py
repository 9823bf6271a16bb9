"""How the shell commands report a refused value: one line, each message after the
option it is about (the model's messages say "this value")."""

from __future__ import annotations

from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.core.management.base import CommandError


def validation_command_error(exc: ValidationError, options: dict[str, str]) -> CommandError:
    """A CommandError for `exc`; `options` maps model field names to the command's options
    ("" for a field whose messages say what they are about)."""
    if not hasattr(exc, "error_dict"):
        return CommandError("; ".join(exc.messages))
    parts = []
    for field, messages in exc.message_dict.items():
        label = "" if field == NON_FIELD_ERRORS else options.get(field, field)
        parts += [f"{label}: {message}" if label else message for message in messages]
    return CommandError("; ".join(parts))
