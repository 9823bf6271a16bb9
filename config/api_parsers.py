"""The management API's JSON parser: DRF's, with a 400 for a body nested too deeply
(Python's parser raises RecursionError near a thousand levels, which DRF's parser lets
through as a 500), at the same limit as the OpenAI-compatible endpoints."""

from __future__ import annotations

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from routing.validation import MAX_NESTING, nested_deeper_than

TOO_DEEP = f"JSON parse error - the body nests arrays and objects more than {MAX_NESTING} deep."


class DepthLimitedJSONParser(JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(TOO_DEEP) from None
        if isinstance(data, dict | list) and nested_deeper_than(data, MAX_NESTING):
            raise ParseError(TOO_DEEP)
        return data
