from pathlib import Path

from django.core.management.base import CommandError

from billing.exports import BULK_FORMATS, invoices_zip
from billing.invoicing import InvoiceError, month_parse
from billing.models import Invoice
from config.commands import ScriptedCommand
from tenants.models import Tenant, tenant_slug_normalize


class Command(ScriptedCommand):
    help = (
        "Write a month's issued invoices (finalized, paid and void) as one ZIP: one file "
        "per invoice in the format asked, and a summary.csv of their totals."
    )

    def add_arguments(self, parser):
        parser.add_argument("month", help="YYYY-MM")
        parser.add_argument("--format", dest="fmt", choices=BULK_FORMATS, default="csv")
        parser.add_argument("--out", default=".", help="Directory for the ZIP (created).")
        parser.add_argument("--tenant", help="Only this tenant (slug).")

    def handle(self, *args, month, fmt, out, tenant, **options):
        try:
            month = month_parse(month)
        except InvoiceError as exc:
            raise CommandError(str(exc)) from None
        invoices = (
            Invoice.objects.filter(month=month)
            .exclude(status=Invoice.Status.DRAFT)
            .select_related("tenant", "corrects")
            .order_by("number")
        )
        if tenant:
            if not Tenant.objects.filter(slug=tenant_slug_normalize(tenant)).exists():
                raise CommandError(f"No tenant with slug {tenant!r}.")
            invoices = invoices.filter(tenant__slug=tenant_slug_normalize(tenant))
        invoices = list(invoices)
        if not invoices:
            raise CommandError(f"No issued invoice for {month:%Y-%m}: run close_month first.")
        if not out.strip():
            raise CommandError("--out needs a directory (. for this one).")
        directory = Path(out)
        if directory.exists() and not directory.is_dir():
            raise CommandError(f"--out {out} is a file, not a directory.")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CommandError(f"Cannot create the directory {out}: {exc.strerror}.") from None
        export = invoices_zip(invoices, fmt, name=f"invoices-{month:%Y-%m}")
        path = directory / export.filename
        try:
            path.write_bytes(export.content)
        except OSError as exc:
            raise CommandError(f"Cannot write {path}: {exc.strerror}.") from None
        self.stderr.write(f"{len(invoices)} invoice(s) of {month:%Y-%m} written.")
        self.stdout.write(str(path))
