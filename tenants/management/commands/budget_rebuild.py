from config.commands import ScriptedCommand
from tenants.budgets import budget_rebuild, pico_to_usd, usd_format


class Command(ScriptedCommand):
    help = "Recompute every budget's spent amount from the usage ledger and report drift."

    def add_arguments(self, parser):
        parser.add_argument("--fix", action="store_true", help="Overwrite drifting counters.")

    def handle(self, *args, fix, **options):
        drifts = budget_rebuild(fix=fix)
        for drift in drifts:
            self.stdout.write(
                f"{drift.period}: live {usd_format(pico_to_usd(drift.live_pico))}, "
                f"ledger {usd_format(pico_to_usd(drift.ledger_pico))}" + (" (fixed)" if fix else "")
            )
        self.stdout.write(f"{len(drifts)} period(s) drifted from the ledger.")
        if drifts and not fix:
            raise SystemExit(1)
