"""The default provider and the catalog from the seeds, prices exactly as published there.

The seeds publish output prices only; input prices are left unset (never invented), which
the routing.W001 system check reports. GLM-4.6V has no published price: it is listed but
refuses calls until an admin prices it. Re-running on a database that has the rows already
changes nothing.
"""

from datetime import UTC, datetime
from decimal import Decimal

from django.db import migrations

DEFAULT_PROVIDER = {
    "name": "global-api",
    "base_url": "https://global-apis.com/v1",
    "api_key_env": "GLOBAL_API_KEY",
    "timeout_seconds": 60.0,
}

PRICES_FROM = datetime(2026, 1, 1, tzinfo=UTC)

DEEPSEEK = ("DeepSeek", "DeepSeek (幻方)")
QWEN = ("Qwen", "Alibaba (阿里)")
KIMI = ("Kimi", "Moonshot AI (月之暗面)")
GLM = ("GLM", "Zhipu AI (智谱)")

# (public id, display name, (family, developer), output $/1M or None, modalities, capabilities)
CATALOG = [
    ("deepseek-v4-flash", "DeepSeek V4 Flash", DEEPSEEK, "0.25", ["text"], ["code"]),
    ("deepseek-v3.2", "DeepSeek V3.2", DEEPSEEK, "0.38", ["text"], []),
    ("deepseek-v4-pro", "DeepSeek V4 Pro", DEEPSEEK, "0.78", ["text"], []),
    ("deepseek-r1", "DeepSeek R1 (Reasoner)", DEEPSEEK, "2.50", ["text"], ["reasoning"]),
    ("deepseek-coder", "DeepSeek Coder", DEEPSEEK, "0.25", ["text"], ["code"]),
    ("Qwen/Qwen3-8B", "Qwen3-8B", QWEN, "0.01", ["text"], []),
    ("Qwen/Qwen3-32B", "Qwen3-32B", QWEN, "0.28", ["text"], []),
    ("Qwen/Qwen3-Coder-30B", "Qwen3-Coder-30B", QWEN, "0.35", ["text"], ["code"]),
    ("Qwen/Qwen3-VL-32B", "Qwen3-VL-32B", QWEN, "0.52", ["text", "image"], ["vision"]),
    (
        "Qwen/Qwen3-Omni-30B",
        "Qwen3-Omni-30B",
        QWEN,
        "0.52",
        ["text", "image", "audio", "video"],
        ["vision"],
    ),
    ("Qwen/Qwen3.5-397B", "Qwen3.5-397B", QWEN, "2.34", ["text"], ["reasoning"]),
    ("Qwen/Qwen3.6-35B", "Qwen3.6-35B", QWEN, "1.00", ["text"], []),
    ("moonshotai/Kimi-K2.5", "Kimi K2.5", KIMI, "3.00", ["text"], ["reasoning"]),
    ("zai-org/GLM-4-9B", "GLM-4-9B", GLM, "0.01", ["text"], []),
    ("zai-org/GLM-5", "GLM-5", GLM, "1.92", ["text"], []),
    ("zai-org/GLM-4.6V", "GLM-4.6V", GLM, None, ["text", "image"], ["vision"]),
]


def seed(apps, schema_editor):
    Provider = apps.get_model("routing", "Provider")
    CatalogModel = apps.get_model("routing", "CatalogModel")
    ModelPrice = apps.get_model("routing", "ModelPrice")

    provider, _ = Provider.objects.get_or_create(
        name=DEFAULT_PROVIDER["name"], defaults=DEFAULT_PROVIDER
    )
    for public_id, display_name, (family, developer), output, modalities, caps in CATALOG:
        model, created = CatalogModel.objects.get_or_create(
            public_id=public_id,
            defaults={
                "display_name": display_name,
                "family": family,
                "developer": developer,
                "provider": provider,
                "upstream_model_id": public_id,
                "context_window": 128_000,
                "modalities": modalities,
                "capabilities": caps,
            },
        )
        if created and output is not None:
            ModelPrice.objects.create(
                model=model, output_per_mtok=Decimal(output), effective_from=PRICES_FROM
            )


class Migration(migrations.Migration):
    dependencies = [("routing", "0001_initial")]

    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
