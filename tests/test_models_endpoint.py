"""GET /v1/models lists exactly what the key may call; GET /v1/models/{id} works for ids
with a slash, sent plain or as %2F."""

from __future__ import annotations

import httpx2
import openai
import pytest

from routing.models import CatalogModel
from tenants.services import api_key_issue

from .conftest import STYLES, model_create


def test_models_lists_the_tenants_allowlist_only(world):
    model_create("m-not-allowed", provider=world.providers["openai"])

    listed = world.client().models.list()

    assert sorted(m.id for m in listed) == sorted(f"m-{s}" for s in STYLES)
    assert {m.object for m in listed} == {"model"}
    assert {m.owned_by for m in listed} == {"Test Lab"}


def test_key_narrowing_and_disabled_models_shrink_the_list(world):
    narrow = api_key_issue(tenant=world.tenant, model_ids=["m-qwen", "m-glm"]).secret
    glm = CatalogModel.objects.get(public_id="m-glm")
    glm.enabled = False
    glm.save()

    assert [m.id for m in world.client(narrow).models.list()] == ["m-qwen"]


def test_tenant_with_an_empty_allowlist_can_call_nothing(world):
    _, secret = world.tenant_with_key("empty", [])
    client = world.client(secret)
    assert client.models.list().data == []
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(
            model="m-openai", messages=[{"role": "user", "content": "x"}]
        )


def test_model_ids_with_a_slash_resolve_plain_and_percent_encoded(world):
    model = model_create("Qwen/Qwen3-32B", provider=world.providers["qwen"])
    world.tenant.allowed_models.add(model)

    assert world.client().models.retrieve("Qwen/Qwen3-32B").id == "Qwen/Qwen3-32B"
    headers = {"Authorization": f"Bearer {world.secret}"}
    for path in ("Qwen/Qwen3-32B", "Qwen%2FQwen3-32B"):
        response = httpx2.get(f"{world.url}/models/{path}", headers=headers)
        assert response.status_code == 200, path
        assert response.json()["id"] == "Qwen/Qwen3-32B"
    completion = world.client().chat.completions.create(
        model="Qwen/Qwen3-32B", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.model == "Qwen/Qwen3-32B"


def test_retrieving_a_model_the_key_may_not_use_is_404(world):
    model_create("m-hidden", provider=world.providers["openai"])
    with pytest.raises(openai.NotFoundError):
        world.client().models.retrieve("m-hidden")
    with pytest.raises(openai.NotFoundError):
        world.client().models.retrieve("never-heard-of-it")


def test_models_need_a_key(world):
    with pytest.raises(openai.AuthenticationError):
        world.client("tg-nope").models.list()
