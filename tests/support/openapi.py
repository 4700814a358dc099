"""Checking answers against the edge's OpenAPI document (gateway_edge/openapi.json):
the subset of OpenAPI 3.0 schema keywords the document uses, and the documented
status, content type and headers of a reply."""

from __future__ import annotations

import re
from decimal import Decimal

from tests.support.http import Reply


class SchemaError(AssertionError):
    pass


def validate(value, schema: dict, document: dict, where: str = "$") -> None:
    """The subset of OpenAPI 3.0 schema keywords our document uses."""
    if "$ref" in schema:
        target = document
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return validate(value, target, document, where)
    for sub in schema.get("allOf", []):
        validate(value, sub, document, where)
    if "oneOf" in schema:
        matches = 0
        for sub in schema["oneOf"]:
            try:
                validate(value, sub, document, where)
                matches += 1
            except SchemaError:
                pass
        if matches != 1:
            raise SchemaError(f"{where}: {value!r} matches {matches} of oneOf")
    kind = schema.get("type")
    checks = {
        "object": lambda v: isinstance(v, dict),
        "string": lambda v: isinstance(v, str),
        "number": lambda v: isinstance(v, (int, Decimal)) and not isinstance(v, bool),
        "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, Decimal) and v.as_tuple().exponent == 0),
        "boolean": lambda v: isinstance(v, bool),
        "array": lambda v: isinstance(v, list),
    }
    if kind and not checks[kind](value):
        raise SchemaError(f"{where}: {value!r} is not {kind}")
    if "items" in schema and isinstance(value, list):
        for index, item in enumerate(value):
            validate(item, schema["items"], document, f"{where}[{index}]")
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaError(f"{where}: {value!r} not in {schema['enum']}")
    if "pattern" in schema and isinstance(value, str):
        if not re.search(schema["pattern"], value):
            raise SchemaError(f"{where}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                raise SchemaError(f"{where}: {name} is required")
        properties = schema.get("properties", {})
        for name, item in value.items():
            if name in properties:
                validate(item, properties[name], document, f"{where}.{name}")
            elif schema.get("additionalProperties") is False:
                raise SchemaError(f"{where}: {name} is not documented")


def conforms(reply: Reply, document: dict, path: str, method: str) -> None:
    responses = document["paths"][path][method.lower()]["responses"]
    assert str(reply.status) in responses, f"{method} {path} answered {reply.status}, not documented"
    documented = responses[str(reply.status)]
    assert reply.headers["content-type"] in documented["content"]
    validate(reply.json, documented["content"]["application/json"]["schema"], document)
    for header, spec in documented.get("headers", {}).items():
        if "$ref" in spec:
            spec = document["components"]["headers"][spec["$ref"].rsplit("/", 1)[-1]]
        if spec.get("required", True):  # X-Signature only when a gateway key is configured
            assert header.lower() in reply.headers, header
