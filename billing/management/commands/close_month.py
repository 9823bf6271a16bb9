from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone
from tqdm import tqdm

from billing.invoicing import InvoiceError, month_bounds, month_close, month_parse
from tenants.models import Tenant


class Command(BaseCommand):
    help = "Build and finalize every tenant's invoice for a month (e.g. 2026-10)."

    def add_arguments(self, parser):
        parser.add_argument("month", help="YYYY-MM, in each tenant's own time zone")
        parser.add_argument("--tenant", help="Only this tenant (slug).")
        parser.add_argument(
            "--dry-run", action="store_true", help="Build and report, finalize nothing."
        )

    def handle(self, *args, month, tenant, dry_run, **options):
        try:
            month = month_parse(month)
        except InvoiceError as exc:
            raise CommandError(str(exc)) from None
        tenants = Tenant.objects.order_by("slug")
        if tenant:
            tenants = tenants.filter(slug=tenant)
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
            )
        for result in results:
            number = result.invoice.number if result.invoice and result.invoice.number else ""
            total = f"{result.invoice.total} USD" if result.invoice else ""
            self.stdout.write(f"{result.tenant.slug}: {result.outcome} {number} {total}".rstrip())
        refusal = "would refuse" if dry_run else "not finalized"
        refused = [r for r in results if r.outcome.startswith(refusal)]
        if refused:
            not_ = "would not be" if dry_run else "not"
            raise CommandError(f"{len(refused)} tenant(s) {not_} finalized; see above.")
