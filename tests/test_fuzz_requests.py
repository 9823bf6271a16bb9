"""Nothing a client sends produces a 500: arbitrary JSON bodies and headers get an
OpenAI-shaped answer with a status below 500 (or 502 when a valid request cannot reach
the unreachable test upstream)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing.models import Provider
from tenants.services import api_key_issue, tenant_create

from .conftest import model_create

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | json_values},
    optional={"content": st.text() | json_values},
)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["m-fuzz", "other"]) | json_values,
        "messages": st.lists(message, max_size=3) | json_values,
        "stream": st.booleans() | json_values,
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": json_values}),
        "max_tokens": st.integers() | json_values,
        "temperature": json_values,
        "n": json_values,
    },
)


@pytest.fixture
def secret(db):
    # Nothing listens on port 9: valid requests end as a clean 502.
    provider = Provider.objects.create(name="nowhere", base_url="http://127.0.0.1:9/v1")
    model_create("m-fuzz", provider=provider)
    tenant = tenant_create(slug="fuzz", name="Fuzz", model_ids=["m-fuzz"])
    return api_key_issue(tenant=tenant).secret


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=bodies | json_values)
def test_no_body_produces_a_server_error(client, secret, body):
    response = client.post(
        "/v1/chat/completions",
        data=json.dumps(body),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {secret}",
    )
    assert response.status_code in (400, 403, 404, 502), response.content
    error = json.loads(response.content)["error"]
    assert set(error) == {"message", "type", "param", "code"}


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(header=st.binary(max_size=80))
def test_no_authorization_header_produces_a_server_error(client, secret, header):
    response = client.get("/v1/models", HTTP_AUTHORIZATION=header.decode("latin-1"))
    assert response.status_code in (200, 401, 403)
