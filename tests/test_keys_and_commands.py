"""Keys are stored as digests only and shown once; the operator's shell commands work
as documented and fail with a clear message."""

from __future__ import annotations

import contextlib
import io
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command, get_commands
from django.core.management.base import CommandError
from django.utils import timezone

from routing.models import Provider, Route
from tenants.models import ApiKey, StaffToken, Tenant
from tenants.services import LAST_USED_RESOLUTION, api_key_issue, key_digest, key_touch

pytestmark = pytest.mark.django_db


def run(*args) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_key_is_stored_as_a_keyed_digest_and_a_prefix_only():
    tenant = Tenant.objects.create(slug="acme", name="Acme")
    issued = api_key_issue(tenant=tenant, name="ci")

    row = ApiKey.objects.filter(pk=issued.key.pk).values().get()
    assert issued.secret not in str(row)
    assert row["digest"] == key_digest(issued.secret)
    assert len(row["digest"]) == 64
    assert issued.secret.startswith(row["prefix"])
    assert len(row["prefix"]) == len("tg-") + 8


def test_digest_depends_on_the_pepper(settings):
    digest = key_digest("tg-same")
    settings.TOLLGATE_KEY_PEPPER = "another-pepper-0123456789abcdef0123456789"
    assert key_digest("tg-same") != digest


def test_last_used_is_written_at_most_once_a_minute():
    tenant = Tenant.objects.create(slug="acme", name="Acme")
    key = api_key_issue(tenant=tenant).key
    start = timezone.now()

    key_touch(key, now=start)
    key_touch(key, now=start + timedelta(seconds=30))
    assert ApiKey.objects.get(pk=key.pk).last_used_at == start

    later = start + LAST_USED_RESOLUTION + timedelta(seconds=1)
    key_touch(key, now=later)
    assert ApiKey.objects.get(pk=key.pk).last_used_at == later


def test_tenant_create_and_key_issue_commands():
    out, _ = run(
        "tenant_create",
        "acme",
        "--name",
        "Acme Corp",
        "--models",
        "deepseek-v4-flash,Qwen/Qwen3-32B",
    )
    assert "Created tenant acme" in out
    tenant = Tenant.objects.get(slug="acme")
    assert sorted(tenant.allowed_models.values_list("public_id", flat=True)) == [
        "Qwen/Qwen3-32B",
        "deepseek-v4-flash",
    ]

    secret, err = run("key_issue", "acme", "--name", "ci")
    secret = secret.strip()
    assert secret.startswith("tg-") and "\n" not in secret  # the secret alone on stdout
    key = ApiKey.objects.get(tenant=tenant)
    assert key.digest == key_digest(secret)
    assert key.prefix in err


def allowlist(slug: str) -> list[str]:
    return sorted(Tenant.objects.get(slug=slug).allowed_models.values_list("public_id", flat=True))


def test_tenant_create_on_an_existing_tenant_changes_only_what_is_given_and_says_so():
    run("tenant_create", "acme", "--name", "Acme", "--models", "deepseek-v4-flash,Qwen/Qwen3-32B")

    out, _ = run(
        "tenant_create",
        "acme",
        "--name",
        "Acme2",
        "--email",
        "ops@acme.test",
        "--timezone",
        "Europe/Paris",
    )
    assert out.strip() == (
        "Updated tenant acme: name, contact_email, timezone; allowlist left as it is (2 models)."
    )
    tenant = Tenant.objects.get(slug="acme")
    assert (tenant.name, tenant.contact_email, tenant.timezone) == (
        "Acme2",
        "ops@acme.test",
        "Europe/Paris",
    )
    assert allowlist("acme") == ["Qwen/Qwen3-32B", "deepseek-v4-flash"]

    out, _ = run("tenant_create", "acme", "--models", "deepseek-v4-flash")
    assert out.strip() == "Updated tenant acme: allowlist set to 1 model (was 2)."
    assert allowlist("acme") == ["deepseek-v4-flash"]
    assert Tenant.objects.get(slug="acme").name == "Acme2"

    out, _ = run("tenant_create", "acme", "--name", "Acme2")
    assert out.strip() == "Tenant acme unchanged; allowlist left as it is (1 model)."

    with pytest.raises(CommandError, match="time zone"):
        run("tenant_create", "acme", "--name", "Acme3", "--timezone", "Mars/Olympus")
    with pytest.raises(CommandError, match="no-such-model"):
        run("tenant_create", "acme", "--name", "Acme3", "--models", "no-such-model")
    assert Tenant.objects.get(slug="acme").name == "Acme2"
    assert allowlist("acme") == ["deepseek-v4-flash"]

    # Only an explicit empty list empties the allowlist.
    out, _ = run("tenant_create", "acme", "--models", "")
    assert "allowlist set to 0 models (was 1)" in out and "call nothing" in out
    assert allowlist("acme") == []


def test_tenant_create_needs_a_name_to_create_a_tenant():
    with pytest.raises(CommandError, match="--name"):
        run("tenant_create", "acme", "--models", "deepseek-v4-flash")
    assert not Tenant.objects.exists()


def test_tenant_create_refuses_unknown_models_and_creates_nothing():
    with pytest.raises(CommandError, match="no-such-model"):
        run(
            "tenant_create", "acme", "--name", "Acme", "--models", "deepseek-v4-flash,no-such-model"
        )
    assert not Tenant.objects.filter(slug="acme").exists()


def test_tenant_create_refuses_a_bad_timezone():
    with pytest.raises(CommandError, match="time zone"):
        run("tenant_create", "acme", "--name", "Acme", "--timezone", "Mars/Olympus")


def test_key_issue_for_unknown_tenant_fails_clearly():
    with pytest.raises(CommandError, match="No tenant"):
        run("key_issue", "ghost")


def test_key_issue_refuses_a_long_name_and_a_far_expiry_in_one_line_storing_nothing():
    Tenant.objects.create(slug="acme", name="Acme")
    get_user_model().objects.create_user("root", is_staff=True)

    with pytest.raises(CommandError) as caught:
        run("key_issue", "acme", "--name", "x" * 500)
    assert str(caught.value) == "--name: Ensure this value has at most 200 characters (it has 500)."
    with pytest.raises(CommandError) as caught:
        run("key_issue", "acme", "--name", "x", "--expires-in-days", "100000000")
    assert str(caught.value) == (
        "--expires-in-days 100000000 is too many: the date would fall after the year 9999."
    )
    with pytest.raises(CommandError, match="--name: Ensure this value has at most 200"):
        run("staff_token_issue", "root", "--name", "x" * 500)
    assert not ApiKey.objects.exists()
    assert not StaffToken.objects.exists()


def test_key_revoke_command_by_prefix():
    tenant = Tenant.objects.create(slug="acme", name="Acme")
    key = api_key_issue(tenant=tenant).key

    out, _ = run("key_revoke", key.prefix)
    assert "Revoked" in out
    assert ApiKey.objects.get(pk=key.pk).revoked_at is not None
    out, _ = run("key_revoke", key.prefix)
    assert "already revoked" in out
    with pytest.raises(CommandError):
        run("key_revoke", "tg-nothing")


def test_a_leaked_secret_pasted_whole_is_revoked_and_never_repeated():
    tenant = Tenant.objects.create(slug="acme", name="Acme")
    issued = api_key_issue(tenant=tenant)

    out, err = run("key_revoke", issued.secret)
    assert f"Revoked key {issued.key.prefix}…" in out
    assert issued.secret not in out + err
    assert ApiKey.objects.get(pk=issued.key.pk).revoked_at is not None
    # A secret that is no key: the message names its prefix, never the rest.
    unknown = "tg-" + "x" * 43
    with pytest.raises(CommandError) as caught:
        run("key_revoke", unknown)
    assert unknown not in str(caught.value) and "tg-xxxxxxxx…" in str(caught.value)
    # budget_set --key takes it too, and names no more of it.
    other = api_key_issue(tenant=tenant)
    out, _ = run("budget_set", "ACME", "5", "--key", other.secret)
    assert other.key.budgets.get().limit_usd == 5
    assert other.secret not in out


def test_commands_take_a_tenant_slug_in_any_case():
    Tenant.objects.create(slug="acme", name="Acme")
    out, _ = run("key_issue", "ACME")
    assert out.strip().startswith("tg-")
    out, _ = run("budget_set", "Acme", "20")
    assert "Budget of" in out


def test_provider_set_creates_updates_and_validates():
    out, _ = run(
        "provider_set",
        "deepseek",
        "--base-url",
        "https://api.deepseek.com/v1",
        "--api-key-env",
        "DEEPSEEK_API_KEY",
    )
    assert "Created" in out
    out, _ = run(
        "provider_set", "deepseek", "--base-url", "https://api.deepseek.com/beta", "--timeout", "10"
    )
    assert "Updated" in out
    provider = Provider.objects.get(name="deepseek")
    assert (provider.base_url, provider.api_key_env, provider.timeout_seconds) == (
        "https://api.deepseek.com/beta",
        "DEEPSEEK_API_KEY",
        10.0,
    )
    with pytest.raises(CommandError, match="valid URL"):
        run("provider_set", "deepseek", "--base-url", "not a url")
    assert Provider.objects.get(name="deepseek").base_url == "https://api.deepseek.com/beta"


def test_provider_secret_is_read_from_the_environment_never_stored(monkeypatch):
    provider = Provider.objects.create(
        name="kimi", base_url="https://api.moonshot.cn/v1", api_key_env="KIMI_KEY"
    )
    monkeypatch.setenv("KIMI_KEY", "sk-kimi-secret")
    assert provider.api_key() == "sk-kimi-secret"
    assert "sk-kimi-secret" not in str(Provider.objects.filter(pk=provider.pk).values().get())
    monkeypatch.delenv("KIMI_KEY")
    assert provider.api_key() is None


def test_demo_setup_is_harmless_to_run_twice(settings, tmp_path):
    settings.BASE_DIR = tmp_path
    first, _ = run("demo_setup", "--mock-url", "http://127.0.0.1:8001/v1")
    second, _ = run("demo_setup", "--mock-url", "http://127.0.0.1:8001/v1")

    key = (tmp_path / ".run" / "demo-key").read_text().strip()
    assert key in first and key in second
    assert ApiKey.objects.filter(tenant__slug="demo").count() == 1
    assert (
        Tenant.objects.get(slug="demo")
        .allowed_models.filter(public_id="deepseek-v4-flash")
        .exists()
    )
    assert Provider.objects.get(name="global-api").base_url == "http://127.0.0.1:8001/v1"
    assert 'OpenAI(base_url="http://127.0.0.1:8000/v1"' in first
    # The seeds' routing, once.
    auto = Route.objects.get(name="auto")
    assert [t.model.public_id for t in auto.targets.all()] == [
        "Qwen/Qwen3-VL-32B",
        "Qwen/Qwen3.5-397B",
        "Qwen/Qwen3-8B",
        "Qwen/Qwen3-32B",
    ]
    assert Route.objects.count() == 2
    assert "auto (the seeds' router)" in first
    assert oct((tmp_path / ".run" / "demo-key").stat().st_mode & 0o777) == "0o600"


def test_a_blank_value_names_the_option_it_came_from():
    with pytest.raises(CommandError, match=r"^--name: This field cannot be blank"):
        run("tenant_create", "zz", "--name", "")
    with pytest.raises(CommandError, match=r"^--base-url: This field cannot be blank"):
        run("provider_set", "p", "--base-url", "")


def test_the_projects_commands_print_no_system_check_warnings(settings, tmp_path):
    """Scripts read what these commands print: the catalog's warnings (routing.W001 and
    W002: a fresh catalog has unset input prices and an unpriced model) are for
    `manage.py check`, `migrate` and `runserver`, not for every key issued."""
    settings.BASE_DIR = tmp_path  # demo_setup writes its .run/ there
    get_user_model().objects.create_user("root", is_staff=True)
    key = api_key_issue(tenant=Tenant.objects.create(slug="acme", name="Acme")).key
    scripted = [
        ("tenant_create", "globex", "--name", "Globex"),
        ("key_issue", "acme"),
        ("budget_set", "acme", "10", "--key", key.prefix),
        ("key_revoke", key.prefix),
        ("provider_set", "p", "--base-url", "https://p.example/v1", "--api-key-env", "P_KEY"),
        ("staff_token_issue", "root"),
        ("budget_rebuild",),
        ("close_month", "2026-10", "--dry-run"),
        ("export_invoices", "2026-10", "--out", str(tmp_path)),  # refused: nothing issued
        ("demo_setup",),
    ]
    ours = {
        name for name, app in get_commands().items() if app in {"routing", "tenants", "billing"}
    }
    assert ours - {"mockupstream"} == {args[0] for args in scripted}  # each of them

    for args in scripted:
        out, err = io.StringIO(), io.StringIO()
        refused = args[0] == "export_invoices"
        with pytest.raises(CommandError) if refused else contextlib.nullcontext():
            # skip_checks=False: the checks manage.py would run first (call_command skips them).
            call_command(*args, skip_checks=False, stdout=out, stderr=err)
        printed = out.getvalue() + err.getvalue()
        assert "routing.W00" not in printed and "System check" not in printed, args

    err = io.StringIO()
    call_command("check", stderr=err)
    assert "routing.W001" in err.getvalue() and "routing.W002" in err.getvalue()
