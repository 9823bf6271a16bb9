from django.core.management.base import CommandError
from django.utils import timezone
from tqdm import tqdm

from billing.invoicing import (
    InvoiceError,
    month_bounds,
    month_close,
    month_parse,
    unpriced_note,
)
from config.commands import ScriptedCommand
from tenants.models import Tenant, tenant_slug_normalize


class Command(ScriptedCommand):
    help = "Build and finalize every tenant's invoice for a month (e.g. 2026-10)."

    def add_arguments(self, parser):
        parser.add_argument("month", help="YYYY-MM, in each tenant's own time zone")
        parser.add_argument("--tenant", help="Only this tenant (slug).")
        parser.add_argument(
            "--dry-run", action="store_true", help="Build and report, finalize nothing."
        )
        parser.add_argument(
            "--accept-unpriced",
            metavar="REASON",
            help="Finalize although some usage has no price: those tokens stay on the "
            "invoice unbilled, and the reason is stored on it and shown by every export. "
            "Needs --tenant.",
        )

    def handle(self, *args, month, tenant, dry_run, accept_unpriced, **options):
        try:
            month = month_parse(month)
        except InvoiceError as exc:
            raise CommandError(str(exc)) from None
        if accept_unpriced is not None:
            # One tenant at a time, so that nobody accepts every tenant's by accident.
            if not tenant:
                raise CommandError("--accept-unpriced needs --tenant: one tenant at a time.")
            if not accept_unpriced.strip():
                raise CommandError("--accept-unpriced needs a reason, in words.")
        tenants = Tenant.objects.order_by("slug")
        if tenant:
            tenants = tenants.filter(slug=tenant_slug_normalize(tenant))
            if not tenants.exists():
                raise CommandError(f"No tenant with slug {tenant!r}.")
        tenants = list(tenants)
        now = timezone.now()
        not_over = [t.slug for t in tenants if now < month_bounds(month, t.timezone)[1]]
        if not_over:
            raise CommandError(
                f"{month:%Y-%m} has not ended yet for {', '.join(not_over[:5])}"
                + (" and others." if len(not_over) > 5 else ".")
            )
        with tqdm(total=len(tenants), unit="tenant", disable=None, file=self.stderr) as bar:
            results = month_close(
                month=month,
                tenants=tenants,
                dry_run=dry_run,
                now=now,
                progress=lambda _: bar.update(),
                accept_unpriced=accept_unpriced,
            )
        for result in results:
            number = result.invoice.number if result.invoice and result.invoice.number else ""
            total = f"{result.invoice.total} USD" if result.invoice else ""
            self.stdout.write(f"{result.tenant.slug}: {result.outcome} {number} {total}".rstrip())
            if result.invoice is not None and result.invoice.unpriced_tokens:
                self.stdout.write(f"  {unpriced_note(result.invoice)}")
        refusal = "would refuse" if dry_run else "not finalized"
        refused = [r for r in results if r.outcome.startswith(refusal)]
        if refused:
            not_ = "would not be" if dry_run else "not"
            raise CommandError(f"{len(refused)} tenant(s) {not_} finalized; see above.")
