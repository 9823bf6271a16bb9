"""Validation of chat completion requests: the fields the gateway relies on, with the
messages OpenAI's API gives. Everything else passes through to the provider untouched."""

from __future__ import annotations

import json
import math
import re

from .errors import InvalidRequest

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
_INTEGER_FIELDS = ("max_tokens", "max_completion_tokens", "n")
# Arrays and objects inside one another, the body itself counting as one. Python's JSON
# parser stops near a thousand levels, but the body is encoded again on its way to the
# provider, deeper in the call stack, where a few levels fewer already fail; far more
# than any request (tool schemas included) needs.
MAX_NESTING = 128
_TOO_DEEP = "The JSON body of your request is nested too deeply."
_NUMBER_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _wrong_type(param: str, expected: str, value: object) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid type for '{param}': expected {expected}, but got {_json_type(value)} instead.",
        param=param,
        code="invalid_type",
    )


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # A number too large for a float (1e400) would become infinity, which JSON cannot
    # carry on to the provider.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def chat_request_parse(raw: bytes) -> dict:
    """The request body as a dict, or a 400 that says what is wrong."""
    try:
        # NaN and Infinity are Python's extensions, not JSON: providers reject them.
        body = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise InvalidRequest(_TOO_DEEP, code="invalid_json") from None
    except ValueError:  # includes UnicodeDecodeError
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The body must be a JSON object.",
            code="invalid_json",
        ) from None
    if _SURROGATE_ESCAPE.search(raw):
        # An escape like \\uD800 may decode to a lone surrogate, which no UTF-8 encoder
        # (ours or the provider's) accepts.
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise InvalidRequest(
                "The JSON body of your request contains an unpaired Unicode surrogate escape.",
                code="invalid_json",
            ) from None
    if not isinstance(body, dict):
        raise InvalidRequest(
            f"The request body must be a JSON object, not {_json_type(body)}.", code="invalid_json"
        )
    if nested_deeper_than(body, MAX_NESTING):
        raise InvalidRequest(
            f"{_TOO_DEEP} At most {MAX_NESTING} levels of arrays and objects are accepted.",
            code="invalid_json",
        )
    chat_request_validate(body)
    return body


def nested_deeper_than(body: dict | list, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` levels deep (without recursion)."""
    pending: list[tuple[dict | list, int]] = [(body, 1)]
    while pending:
        node, depth = pending.pop()
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                if depth == limit:
                    return True
                pending.append((child, depth + 1))
    return False


def chat_request_validate(body: dict) -> None:
    model = body.get("model")
    if model is None:
        raise InvalidRequest(
            "Missing required parameter: 'model'.", param="model", code="missing_required_parameter"
        )
    if not isinstance(model, str):
        raise _wrong_type("model", "a string", model)
    if not model.strip():
        raise InvalidRequest("'model' must not be empty.", param="model", code="invalid_value")

    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest(
            "Missing required parameter: 'messages'.",
            param="messages",
            code="missing_required_parameter",
        )
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array", messages)
    if not messages:
        raise InvalidRequest(
            "'messages' must contain at least one message.", param="messages", code="invalid_value"
        )
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _wrong_type(param, "an object", message)
        role = message.get("role")
        if not isinstance(role, str):
            raise _wrong_type(f"{param}.role", "a string", role)
        if role not in _ROLES:
            raise InvalidRequest(
                f"Invalid value for '{param}.role': {role!r}. Supported values are: "
                + ", ".join(sorted(_ROLES))
                + ".",
                param=f"{param}.role",
                code="invalid_value",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _wrong_type(f"{param}.content", "a string or an array of parts", content)

    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _wrong_type("stream", "a boolean", stream)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _wrong_type("stream_options", "an object", options)
        include_usage = options.get("include_usage")
        if include_usage is not None and not isinstance(include_usage, bool):
            raise _wrong_type("stream_options.include_usage", "a boolean", include_usage)
    for field in _INTEGER_FIELDS:
        value = body.get(field)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise _wrong_type(field, "an integer", value)
        if value < 1:
            raise InvalidRequest(
                f"Invalid '{field}': integer below minimum value. Expected a value >= 1, "
                f"but got {value} instead.",
                param=field,
                code="integer_below_min_value",
            )
    for field in _NUMBER_FIELDS:
        value = body.get(field)
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
            raise _wrong_type(field, "a number", value)
