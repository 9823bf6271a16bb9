from django.db import migrations, models
from django.db.models import F


def alerts_before_were_queued(apps, schema_editor):
    # Alerts from before this column were queued when they fired: the beat task must not
    # send them again.
    BudgetAlert = apps.get_model("tenants", "BudgetAlert")
    BudgetAlert.objects.update(queued_at=F("created_at"))


class Migration(migrations.Migration):
    dependencies = [
        ("tenants", "0009_budget_refusals_in_words"),
    ]

    operations = [
        migrations.AddField(
            model_name="budgetalert",
            name="queued_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.RunPython(alerts_before_were_queued, migrations.RunPython.noop),
    ]
