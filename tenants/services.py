"""Writes for tenants and keys. A key's secret exists in clear only in the return value
of the function that issues it."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Generic, TypeVar

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from routing.models import CatalogModel

from .models import ApiKey, Budget, KeyBase, StaffToken, Tenant

API_KEY_MARK = "tg-"
STAFF_TOKEN_MARK = "tgs-"  # noqa: S105  (a prefix, not a secret)
# Characters of the secret kept as the display prefix (the mark plus 8 random ones).
PREFIX_RANDOM_CHARS = 8
# last_used_at is written at most this often per key, not on every request.
LAST_USED_RESOLUTION = timedelta(minutes=1)


class UnknownModelsError(ValueError):
    def __init__(self, unknown: list[str]):
        self.unknown = unknown
        super().__init__(f"Unknown model ids: {', '.join(unknown)}")


def key_digest(secret: str) -> str:
    """HMAC-SHA256 of a secret under the server-side pepper, as hex."""
    return hmac.new(
        settings.TOLLGATE_KEY_PEPPER.encode(), secret.encode(), hashlib.sha256
    ).hexdigest()


def api_key_named(value: str) -> tuple[ApiKey | None, str]:
    """The API key an operator names on the command line: by its display prefix (a
    trailing … allowed) or by the whole secret, pasted when revoking a leaked key. Also
    what to call it in a message: the prefix, never more of a secret."""
    value = value.strip().rstrip("…")
    shown = value[: len(API_KEY_MARK) + PREFIX_RANDOM_CHARS]
    if len(value) > len(shown):
        return ApiKey.objects.filter(digest=key_digest(value)).first(), f"{shown}…"
    return ApiKey.objects.filter(prefix=value).first(), value


K = TypeVar("K", bound=KeyBase)


@dataclass(frozen=True)
class IssuedKey(Generic[K]):
    key: K
    secret: str  # shown once, never stored


def _issue(model: type[K], mark: str, **fields) -> IssuedKey[K]:
    # The model's own rules (a name's length, an expiry in the future, the owner exists)
    # for every caller, before a secret is drawn: SQLite would store an overlong name.
    model(**fields).full_clean(exclude=["prefix", "digest"], validate_unique=False)
    for _attempt in range(5):
        secret = mark + secrets.token_urlsafe(32)
        prefix = secret[: len(mark) + PREFIX_RANDOM_CHARS]
        try:
            with transaction.atomic():
                key = model.objects.create(prefix=prefix, digest=key_digest(secret), **fields)
        except IntegrityError:
            continue  # a prefix collision: draw again
        return IssuedKey(key=key, secret=secret)
    raise RuntimeError("Could not draw a unique key prefix.")


def catalog_models_resolve(public_ids: list[str]) -> list[CatalogModel]:
    """Catalog models by public id, all or nothing."""
    wanted = [p.strip() for p in public_ids if p.strip()]
    found = {m.public_id: m for m in CatalogModel.objects.filter(public_id__in=wanted)}
    unknown = [p for p in wanted if p not in found]
    if unknown:
        raise UnknownModelsError(unknown)
    return [found[p] for p in wanted]


def api_key_models_check(*, tenant: Tenant, models: Iterable[CatalogModel]) -> None:
    """Refuse to narrow a key to models outside its tenant's allowlist: the key could never
    call them (a 403 on each), and a list of only such models leaves it nothing at all.

    Raises ValidationError on `allowed_models`. The services, the management API and the
    admin's key form all call this one check.
    """
    allowed = set(tenant.allowed_models.values_list("pk", flat=True))
    outside = [m.public_id for m in models if m.pk not in allowed]
    if outside:
        raise ValidationError(
            {
                "allowed_models": f"Not in {tenant.slug}'s allowlist: {', '.join(outside)}. "
                "Add them to the tenant's allowlist first, or leave them out (an empty "
                "list means the tenant's whole allowlist)."
            }
        )


def tenant_allowlist_check(*, tenant: Tenant, models: Iterable[CatalogModel]) -> None:
    """Refuse a tenant allowlist that leaves out a model one of its usable keys is
    narrowed to: the key would be refused that model (and, narrowed to such models alone,
    everything), with nothing to say why. The counterpart of api_key_models_check.

    Raises ValidationError on `allowed_models`, naming the keys by their prefixes."""
    if tenant.pk is None:
        return
    kept = {m.pk for m in models}
    now = timezone.now()
    usable = ApiKey.objects.filter(tenant=tenant, revoked_at__isnull=True).filter(
        Q(expires_at__isnull=True) | Q(expires_at__gt=now)
    )
    stranded: dict[str, list[str]] = {}
    for prefix, public_id in (
        ApiKey.allowed_models.through.objects.filter(apikey__in=usable)
        .exclude(catalogmodel_id__in=kept)
        .values_list("apikey__prefix", "catalogmodel__public_id")
        .order_by("apikey__prefix", "catalogmodel__public_id")
    ):
        stranded.setdefault(prefix, []).append(public_id)
    if stranded:
        keys = "; ".join(f"{p}… ({', '.join(ids)})" for p, ids in stranded.items())
        raise ValidationError(
            {
                "allowed_models": f"Keys of {tenant.slug} are narrowed to models this list "
                f"leaves out: {keys}. Change or revoke those keys first, or keep the models."
            }
        )


@transaction.atomic
def tenant_create(
    *,
    slug: str,
    name: str,
    model_ids: list[str] | None = None,
    contact_email: str = "",
    timezone_name: str = "UTC",
    alert_webhook_url: str = "",
) -> Tenant:
    """Create a tenant with an explicit model allowlist (possibly empty). The slug is
    stored lower case; ValidationError when it is taken in any case."""
    tenant = Tenant(
        slug=slug,
        name=name,
        contact_email=contact_email,
        timezone=timezone_name,
        alert_webhook_url=alert_webhook_url,
    )
    tenant.full_clean()
    tenant.save()
    if model_ids:
        tenant.allowed_models.set(catalog_models_resolve(model_ids))
    return tenant


@transaction.atomic
def tenant_update(
    *,
    tenant: Tenant,
    slug: str | None = None,
    name: str | None = None,
    contact_email: str | None = None,
    alert_webhook_url: str | None = None,
    timezone_name: str | None = None,
    model_ids: list[str] | None = None,
) -> list[str]:
    """Change what is given of a tenant, leaving the rest (None) as it is; the allowlist
    changes only when `model_ids` is given, and an empty list empties it.

    Returns the names of the fields that changed. Raises ValidationError or
    UnknownModelsError and changes nothing when a value is refused.
    """
    models = catalog_models_resolve(model_ids) if model_ids is not None else None
    if models is not None:
        tenant_allowlist_check(tenant=tenant, models=models)
    given = {
        "slug": slug,
        "name": name,
        "contact_email": contact_email,
        "alert_webhook_url": alert_webhook_url,
        "timezone": timezone_name,
    }
    before = {field: getattr(tenant, field) for field in given}
    for field, value in given.items():
        if value is not None:
            setattr(tenant, field, value)
    changed = [field for field in given if getattr(tenant, field) != before[field]]
    if changed:
        try:
            tenant.full_clean()  # lowers the slug, which may then be what it was
        except ValidationError:
            for field, value in before.items():
                setattr(tenant, field, value)
            raise
        changed = [field for field in given if getattr(tenant, field) != before[field]]
        if changed:
            tenant.save(update_fields=changed)
    if models is not None:
        allowed_before = set(tenant.allowed_models.values_list("pk", flat=True))
        if allowed_before != {m.pk for m in models}:
            tenant.allowed_models.set(models)
            changed.append("allowed_models")
    return changed


def tenant_allowlist_set(*, tenant: Tenant, model_ids: list[str]) -> None:
    """Replace the tenant's allowlist. Raises UnknownModelsError, or ValidationError when
    it leaves out a model a key is narrowed to (tenant_allowlist_check)."""
    models = catalog_models_resolve(model_ids)
    tenant_allowlist_check(tenant=tenant, models=models)
    tenant.allowed_models.set(models)


def tenant_suspend(*, tenant: Tenant) -> None:
    """Block every key of the tenant from its next request on."""
    Tenant.objects.filter(pk=tenant.pk).update(status=Tenant.Status.SUSPENDED)
    tenant.status = Tenant.Status.SUSPENDED


def tenant_resume(*, tenant: Tenant) -> None:
    Tenant.objects.filter(pk=tenant.pk).update(status=Tenant.Status.ACTIVE)
    tenant.status = Tenant.Status.ACTIVE


@transaction.atomic
def api_key_issue(
    *,
    tenant: Tenant,
    name: str = "",
    expires_at: datetime | None = None,
    model_ids: list[str] | None = None,
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
    concurrency_limit: int | None = None,
) -> IssuedKey[ApiKey]:
    """Issue a key for a tenant; the secret is in the result and nowhere else.

    Raises UnknownModelsError for ids not in the catalog, and ValidationError (issuing
    nothing) for models outside the tenant's allowlist or a field the model refuses.
    """
    narrowed = catalog_models_resolve(model_ids) if model_ids else []
    api_key_models_check(tenant=tenant, models=narrowed)
    issued = _issue(
        ApiKey,
        API_KEY_MARK,
        tenant=tenant,
        name=name,
        expires_at=expires_at,
        rpm_limit=rpm_limit,
        tpm_limit=tpm_limit,
        concurrency_limit=concurrency_limit,
    )
    if narrowed:
        issued.key.allowed_models.set(narrowed)
    return issued


@transaction.atomic
def api_key_rotate(*, key: ApiKey, grace: timedelta) -> IssuedKey[ApiKey]:
    """Issue a replacement for a key: same tenant, name, model list, limits and budget.

    The old key keeps working for `grace`, then expires (sooner if it was due to).
    """
    if not key.is_usable():
        raise ValueError("Only a usable key can be rotated.")
    if key.concurrency_limit == 0:  # stored before limits were at least 1
        raise ValueError(
            f"{key.prefix}… has a concurrency limit of 0, which no call fits: set it to at "
            "least 1, or revoke the key, before rotating it."
        )
    now = timezone.now()
    issued = _issue(
        ApiKey,
        API_KEY_MARK,
        tenant=key.tenant,
        name=key.name,
        expires_at=key.expires_at,
        rpm_limit=key.rpm_limit,
        tpm_limit=key.tpm_limit,
        concurrency_limit=key.concurrency_limit,
    )
    issued.key.allowed_models.set(key.allowed_models.all())
    for budget in Budget.objects.filter(api_key=key):
        Budget.objects.create(
            tenant=budget.tenant,
            api_key=issued.key,
            limit_usd=budget.limit_usd,
            hard=budget.hard,
            alert_thresholds=budget.alert_thresholds,
        )
    ends = now + grace
    key.expires_at = min(key.expires_at, ends) if key.expires_at else ends
    key.replaced_by = issued.key
    key.save(update_fields=["expires_at", "replaced_by"])
    return issued


def key_revoke(*, key: KeyBase) -> None:
    """Revoke an API key or staff token; refused from its next request on, everywhere."""
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        type(key).objects.filter(pk=key.pk, revoked_at__isnull=True).update(
            revoked_at=key.revoked_at
        )


def staff_token_issue(
    *, user, name: str = "", expires_at: datetime | None = None
) -> IssuedKey[StaffToken]:
    """Issue a management API token acting as `user`; the secret is in the result only."""
    return _issue(StaffToken, STAFF_TOKEN_MARK, user=user, name=name, expires_at=expires_at)


def key_touch(key: KeyBase, *, now: datetime) -> None:
    """Record use, writing at most once per LAST_USED_RESOLUTION per key."""
    if key.last_used_at is not None and now - key.last_used_at < LAST_USED_RESOLUTION:
        return
    type(key).objects.filter(pk=key.pk).update(last_used_at=now)
    key.last_used_at = now
