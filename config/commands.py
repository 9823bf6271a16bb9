"""The base of the project's own management commands."""

from __future__ import annotations

import argparse

from django.core.management.base import BaseCommand


class ScriptedCommand(BaseCommand):
    """Base of the commands operators script (tenant_create, key_issue, budget_set,
    close_month, ...); mockupstream has its own reasons to skip the checks."""

    # No system checks before running: their catalog warnings (routing.W001/W002, unset
    # prices) would add six lines to every script's stderr at every run, and a second copy
    # to `make run` after migrate's. `manage.py check`, `migrate` and `runserver` still
    # report them.
    requires_system_checks: list[str] = []

    def create_parser(self, prog_name: str, subcommand: str, **kwargs) -> argparse.ArgumentParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        # Django offers --skip-checks only to commands that run checks: a script that
        # passed it to quiet the warnings keeps working (it changes nothing now).
        parser.add_argument("--skip-checks", action="store_true", help=argparse.SUPPRESS)
        return parser
