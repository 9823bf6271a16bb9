"""`manage.py mockupstream`: run the fake OpenAI-compatible upstream (see routing.mockupstream)."""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from routing import mockupstream


class Command(BaseCommand):
    help = "Run a fake OpenAI-compatible upstream provider (for tests, the demo and benchmarks)."
    # The mock touches neither the database nor the project's apps: checks would only slow
    # its start and tie it to the state of code it does not use.
    requires_system_checks: list[str] = []
    requires_migrations_checks = False

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        mockupstream.add_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            defaults = mockupstream.defaults_from_options(options)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        try:
            mockupstream.serve(options["host"], options["port"], defaults)
        except mockupstream.ListenError as exc:
            raise CommandError(str(exc)) from None
