"""With the unique slug, no two tenants whose slugs differ only in case (0005 lowered the
slugs already there)."""

import django.db.models.functions.text
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("tenants", "0005_tenant_slugs_lower_case"),
    ]

    operations = [
        migrations.AddConstraint(
            model_name="tenant",
            constraint=models.CheckConstraint(
                condition=models.Q(("slug", django.db.models.functions.text.Lower("slug"))),
                name="tenant_slug_lower_case",
                violation_error_message="A tenant's slug is lower case.",
            ),
        ),
    ]
