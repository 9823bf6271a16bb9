"""Tenant slugs become lower case, so that no two differ only in case (0006 then adds the
constraint that keeps them so; apart, as PostgreSQL may refuse to alter a table that the
same transaction has just updated).

Existing slugs with capitals are lowered. Where that would clash with another tenant's
slug (say "acme" and "ACME" both exist), the migration does not fail: a slug that is
already lower case keeps it, and the others, oldest tenant first, get the first free
"-2", "-3", ... suffix ("ACME" becomes "acme-2"). Each change is printed. Only the slug
changes: keys, budgets, usage and invoices refer to the tenant by id, so every key keeps
working; what changes is the name operators use in the shell and in /api/ URLs.
"""

from django.db import migrations

SLUG_MAX_LENGTH = 64


def slugs_lower_case(apps, schema_editor):
    Tenant = apps.get_model("tenants", "Tenant")
    tenants = list(Tenant.objects.order_by("pk").only("pk", "slug"))
    taken = {t.slug for t in tenants if t.slug == t.slug.lower()}
    for tenant in tenants:
        if tenant.slug == tenant.slug.lower():
            continue
        base = new = tenant.slug.lower()
        n = 2
        while new in taken:
            suffix = f"-{n}"
            new = base[: SLUG_MAX_LENGTH - len(suffix)] + suffix
            n += 1
        taken.add(new)
        # Lower case and unique among the lower-case ones, so no clash with a slug not
        # yet lowered (those have capitals) either.
        Tenant.objects.filter(pk=tenant.pk).update(slug=new)
        why = "" if new == base else f" ({base!r} was taken)"
        print(f"\n  Tenant id {tenant.pk}: slug {tenant.slug!r} is now {new!r}{why}.", end="")


class Migration(migrations.Migration):

    dependencies = [
        ("tenants", "0004_orderings_without_joins"),
    ]

    operations = [
        migrations.RunPython(slugs_lower_case, migrations.RunPython.noop),
    ]
