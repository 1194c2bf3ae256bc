"""Bad request bodies generated from the app's OpenAPI schema: for every JSON request body, from a
valid body, one fault at a time (malformed JSON, a non-object body, an unknown field, each required
field missing, each field of the wrong type, out of range, too short / too long, not in its enum),
recursing into nested objects and the first item of arrays of objects.

Each mutation says which field the answer must name (``field``; None: the body as a whole)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Mutation:
    what: str
    body: Any  # JSON value, or raw text when ``raw``
    field: str | None
    raw: bool = False


def resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Follow $ref and drop the ``null`` branch of Optional (anyOf [X, null])."""
    while True:
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            schema = spec["components"]["schemas"][name]
            continue
        branches = schema.get("anyOf")
        if branches:
            real = [b for b in branches if b.get("type") != "null"]
            if len(real) == 1:
                schema = {**{k: v for k, v in schema.items() if k != "anyOf"}, **real[0]}
                continue
        return schema


def _wrong_type(schema: dict[str, Any]) -> Any:
    t = schema.get("type")
    if "enum" in schema or t == "string":
        return 12345
    if t in ("integer", "number"):
        return "not a number"
    if t == "boolean":
        return "maybe"
    if t == "array":
        return "not a list"
    if t == "object" or "properties" in schema:
        return ["not", "an", "object"]
    return None


def _out_of_range(schema: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    t = schema.get("type")
    if t in ("integer", "number"):
        step = 1 if t == "integer" else 0.5
        if "minimum" in schema:
            yield "below minimum", (int if t == "integer" else float)(schema["minimum"] - step)
        if "maximum" in schema:
            yield "above maximum", (int if t == "integer" else float)(schema["maximum"] + step)
        if "exclusiveMinimum" in schema:
            yield "at exclusive minimum", schema["exclusiveMinimum"]
    if t == "string":
        if schema.get("minLength", 0) >= 1:
            yield "too short", ""
        if "maxLength" in schema:
            yield "too long", "x" * (schema["maxLength"] + 1)
    if t == "array":
        if schema.get("minItems", 0) >= 1:
            yield "too few items", []
        if "maxItems" in schema:
            item = schema.get("items", {})
            yield "too many items", [_sample(item)] * (schema["maxItems"] + 1)
    if "enum" in schema:
        yield "not in enum", "not-a-member"


def _sample(schema: dict[str, Any]) -> Any:
    t = schema.get("type")
    return {"string": "x", "integer": 1, "number": 1.0, "boolean": True, "array": [], "object": {}}.get(t, "x")


def field_mutations(spec: dict[str, Any], schema: dict[str, Any], valid: Any, path: list[str | int]
                    ) -> Iterator[tuple[str, list[str | int], Any]]:
    """(what, path, bad value) for every field reachable in ``valid`` (and every property of the schema)."""
    schema = resolve(spec, schema)
    props = schema.get("properties")
    if props is not None and isinstance(valid, dict):
        for name, sub in props.items():
            sub_r = resolve(spec, sub)
            p = [*path, name]
            bad = _wrong_type(sub_r)
            if bad is not None:
                yield "wrong type", p, bad
            for what, value in _out_of_range(sub_r):
                yield what, p, value
            if name in valid:
                yield from field_mutations(spec, sub, valid[name], p)
    elif schema.get("type") == "array" and isinstance(valid, list) and valid:
        item = resolve(spec, schema.get("items", {}))
        if "properties" in item:
            yield from field_mutations(spec, item, valid[0], [*path, 0])


def _set(body: Any, path: list[str | int], value: Any) -> Any:
    out = copy.deepcopy(body)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def _drop(body: Any, path: list[str | int]) -> Any:
    out = copy.deepcopy(body)
    node = out
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return out


def _objects(spec: dict[str, Any], schema: dict[str, Any], valid: Any, path: list[str | int]
             ) -> Iterator[tuple[list[str | int], dict[str, Any], Any]]:
    """Every object node of ``valid`` with its schema (for unknown-field / missing-field faults)."""
    schema = resolve(spec, schema)
    if "properties" in schema and isinstance(valid, dict):
        yield path, schema, valid
        for name, sub in schema["properties"].items():
            if name in valid and valid[name] is not None:
                yield from _objects(spec, sub, valid[name], [*path, name])
    elif schema.get("type") == "array" and isinstance(valid, list) and valid:
        yield from _objects(spec, schema.get("items", {}), valid[0], [*path, 0])


def dotted(path: list[str | int]) -> str:
    return ".".join(str(p) for p in path) or "(body)"


def mutations(spec: dict[str, Any], schema: dict[str, Any], valid: dict[str, Any]) -> list[Mutation]:
    out = [
        Mutation("malformed JSON", '{"sdp": "v=0", ', None, raw=True),
        Mutation("truncated JSON", "{", None, raw=True),
        Mutation("a list, not an object", [valid], None),
        Mutation("a string, not an object", "hello", None),
    ]
    for path, obj_schema, node in _objects(spec, schema, valid, []):
        if obj_schema.get("additionalProperties") is False:
            out.append(Mutation("unknown field", _set(valid, [*path, "no_such_field"], 1) if path else
                                {**valid, "no_such_field": 1}, dotted([*path, "no_such_field"])))
        for name in obj_schema.get("required", []):
            if name in node:
                out.append(Mutation(f"missing required {name}", _drop(valid, [*path, name]), dotted([*path, name])))
    for what, path, value in field_mutations(spec, schema, valid, []):
        out.append(Mutation(f"{what}: {dotted(path)}", _set(valid, path, value), dotted(path)))
    return out
