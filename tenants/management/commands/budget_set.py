from decimal import Decimal, InvalidOperation

from django.core.exceptions import ValidationError
from django.core.management.base import CommandError

from config.command_errors import validation_command_error
from config.commands import ScriptedCommand
from tenants.budgets import budget_set, budget_status, usd_format
from tenants.models import MAX_BUDGET_USD, Tenant, tenant_slug_normalize
from tenants.services import api_key_named


def _usd(value: str) -> Decimal:
    """The limit, positive like the API's (the model refuses more than six decimal places).
    Called in handle(): a CommandError raised by an argument's type escapes argparse and
    Django's handling alike, as a traceback."""
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise CommandError(f"{value!r} is not an amount in USD.") from None
    if not amount.is_finite() or amount <= 0:
        raise CommandError("The limit must be a positive amount in USD.")
    if amount > MAX_BUDGET_USD:
        raise CommandError("The limit must be at most 9,000,000 USD a month.")
    return amount


class Command(ScriptedCommand):
    help = "Set the monthly budget (USD) of a tenant, or of one of its keys with --key."

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("usd", help="Monthly limit in USD, more than 0.")
        parser.add_argument("--key", help="Display prefix of the key (e.g. tg-AbCd1234).")
        parser.add_argument("--soft", action="store_true", help="Alert only; never refuse.")
        parser.add_argument(
            "--alerts", default=None, help="Comma-separated percentages (default 50,80,100)."
        )

    def handle(self, *args, slug, usd, key, soft, alerts, **options):
        usd = _usd(usd)
        tenant = Tenant.objects.filter(slug=tenant_slug_normalize(slug)).first()
        if tenant is None:
            raise CommandError(f"No tenant with slug {slug!r}.")
        api_key = None
        if key:
            api_key, shown = api_key_named(key)
            if api_key is None or api_key.tenant_id != tenant.pk:
                raise CommandError(f"Tenant {tenant.slug} has no key {shown!r}.")
        thresholds = None
        if alerts is not None:
            try:
                thresholds = [int(a) for a in alerts.split(",") if a.strip()]
            except ValueError:
                raise CommandError("--alerts takes whole percentages, e.g. 50,80,100.") from None
        try:
            budget = budget_set(
                tenant=tenant,
                limit_usd=usd,
                key=api_key,
                hard=not soft,
                alert_thresholds=thresholds,
            )
        except ValidationError as exc:
            raise validation_command_error(
                exc, {"limit_usd": "", "alert_thresholds": "--alerts", "hard": "--soft"}
            ) from None
        status = budget_status(budget)
        kind = "soft" if soft else "hard"
        scope = f"key {api_key.prefix}…" if api_key else f"tenant {slug}"
        self.stdout.write(
            f"Budget of {scope}: {usd_format(budget.limit_usd)} a month ({kind}), alerts at "
            f"{', '.join(f'{t}%' for t in budget.alert_thresholds)}; "
            f"spent {usd_format(status.spent)} so far this month."
        )
