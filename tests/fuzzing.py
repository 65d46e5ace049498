"""Generators for the fuzz suites: JSON bodies derived from the gateway's pydantic models and then
mutated, protobuf messages derived from their descriptors, hostile values, and the run profile.

CI runs a fixed number of examples per entry point, derandomized (the same examples every run).
`SPLITSPEC_FUZZ=long` multiplies the examples by SPLITSPEC_FUZZ_SCALE (default 20) and draws new
ones every run: the local campaign.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
LONG_CAMPAIGN = os.environ.get("SPLITSPEC_FUZZ") == "long"
SCALE = int(os.environ.get("SPLITSPEC_FUZZ_SCALE", "20")) if LONG_CAMPAIGN else 1

EDGE_INTS = [0, 1, -1, 2, 255, 256, INT32_MAX, INT32_MIN, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, -(2**63) - 1,
             2**64, 10**30]
EDGE_FLOATS = [0.0, -0.0, 5e-324, 1e-45, 1e-6, 0.5, 1.0, 1.0000001, 2.0, 1e30, 3.5e38, 1e308, -1e308, -1.0,
               math.nan, math.inf, -math.inf]
ODD_TEXT = ["", " ", "\x00", "\ud800", "\udfff", "\u202e\u0645", "🦙" * 50, "\r\n\t", "a\x00b", "<s></s><unk>",
            "<0xFF>", "\ufffd" * 10, "ß" * 300, "null", "[DONE]", "data: x\n\n"]


def fuzz(examples: int) -> settings:
    """`examples` in CI (derandomized, no database); SCALE times as many, random, in a long campaign."""
    return settings(max_examples=examples * SCALE, derandomize=not LONG_CAMPAIGN, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def huge_text() -> st.SearchStrategy[str]:
    return st.sampled_from(["x" * 100_000, "é" * 50_000, "🦙" * 25_000, "once upon a time " * 6_000])


def odd_text(max_size: int = 40, utf8: bool = False) -> st.SearchStrategy[str]:
    """Text with control characters, lone surrogates (not with `utf8`: protobuf strings must
    encode), right-to-left marks, special-token spellings and SSE framing."""
    text = st.one_of(st.text(max_size=max_size), st.sampled_from(ODD_TEXT))
    return text.filter(_encodes) if utf8 else text


def _encodes(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def edge_ints() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(EDGE_INTS), st.integers())


def edge_floats() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from(EDGE_FLOATS), st.floats())


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def hostile_json_values() -> st.SearchStrategy[Any]:
    """A value of the wrong type, at a numeric edge, huge, deeply nested, odd unicode, or null."""
    scalars = st.one_of(st.none(), st.booleans(), edge_ints(), edge_floats(), odd_text(), huge_text())
    return st.one_of(
        scalars,
        st.lists(scalars, max_size=4),
        st.dictionaries(odd_text(10), scalars, max_size=3),
        st.sampled_from([nested(30), nested(900), {"a": {"b": {"c": [None]}}}, [[1, 2], [3]], [[]], [{}]]),
    )


def from_json_schema(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> st.SearchStrategy[Any]:
    """Values that satisfy `schema` (the subset pydantic emits: $ref, anyOf, enum, const, objects,
    arrays, strings, numbers with bounds). Strings and lists stay short: valid bodies should mostly
    reach the model and finish quickly."""
    defs = defs if defs is not None else schema.get("$defs", {})
    if "$ref" in schema:
        return st.deferred(lambda: from_json_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs))
    if "anyOf" in schema:
        return st.one_of([from_json_schema(option, defs) for option in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":  # small values mostly, and the edges the bounds allow (none: past int64)
        low = schema.get("minimum", schema["exclusiveMinimum"] + 1 if "exclusiveMinimum" in schema else None)
        high = schema.get("maximum", schema["exclusiveMaximum"] - 1 if "exclusiveMaximum" in schema else None)
        start = low if low is not None else -5
        edges = [e for e in EDGE_INTS if (low is None or e >= low) and (high is None or e <= high)]
        small = st.integers(start, start + 40 if high is None else min(high, start + 40))
        return st.one_of(small, small, st.integers(low, high), st.sampled_from(edges or [start]))
    if kind == "number":
        return st.floats(min_value=schema.get("minimum", schema.get("exclusiveMinimum")),
                         max_value=schema.get("maximum", schema.get("exclusiveMaximum")),
                         exclude_min="exclusiveMinimum" in schema, exclude_max="exclusiveMaximum" in schema,
                         allow_nan=False, allow_infinity=False)
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=24)
    if kind == "array":
        items = from_json_schema(schema.get("items", {}), defs)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=max(schema.get("minItems", 0), 3))
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties", {})
        if not properties:
            return st.dictionaries(st.text(max_size=8), st.one_of(st.none(), st.booleans(), st.text(max_size=8)),
                                   max_size=3)
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {name: from_json_schema(sub, defs) for name, sub in properties.items() if name in required},
            optional={name: from_json_schema(sub, defs) for name, sub in properties.items() if name not in required})
    return st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8))


@st.composite
def mutated(draw: Callable, bodies: st.SearchStrategy[dict[str, Any]], fields: list[str]) -> dict[str, Any]:
    """A body from `bodies` with 0-3 of its `fields` swapped for hostile values, dropped, or joined
    by an unknown one."""
    body = dict(draw(bodies))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(fields))
        action = draw(st.sampled_from(["replace", "replace", "replace", "drop", "extra"]))
        if action == "replace":
            body[name] = draw(hostile_json_values())
        elif action == "drop":
            body.pop(name, None)
        else:
            body[draw(st.text(min_size=1, max_size=12))] = draw(hostile_json_values())
    return body


def messages(descriptor: Descriptor, overrides: dict[str, st.SearchStrategy] | None = None,
             depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Field values for a protobuf message of `descriptor`, every field optional, scalars at their
    type's edges (`overrides`: a strategy per field name, top level only). Build the message with
    `Message(**values)`; nested messages come as dicts, which protobuf accepts."""
    overrides = overrides or {}
    optional = {}
    for field in descriptor.fields:
        value = overrides.get(field.name) or field_values(field, depth)
        if value is not None:
            optional[field.name] = value
    return st.fixed_dictionaries({}, optional=optional)


def field_values(field: FieldDescriptor, depth: int = 0) -> st.SearchStrategy[Any] | None:
    """Values for one protobuf field at its type's edges (None: a message nested too deep)."""
    if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
        entry = field.message_type.fields_by_name
        values = field_values(entry["value"], depth + 1)
        return None if values is None else st.dictionaries(_scalar(entry["key"]), values, max_size=4)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if depth >= 2:
            return None
        value = messages(field.message_type, depth=depth + 1)
    else:
        value = _scalar(field)
    return st.lists(value, max_size=4) if _repeated(field) else value


@st.composite
def with_hostile_fields(draw: Callable, valid: st.SearchStrategy[dict[str, Any]], descriptor: Descriptor,
                        most: int = 2) -> dict[str, Any]:
    """A valid message's fields with up to `most` of them dropped or swapped for edge values of
    their type: most examples get past the first check, and each check is reached by some."""
    fields = dict(draw(valid))
    for _ in range(draw(st.integers(0, most))):
        field = draw(st.sampled_from(list(descriptor.fields)))
        values = field_values(field)
        if values is None or draw(st.integers(0, 4)) == 0:
            fields.pop(field.name, None)
        else:
            fields[field.name] = draw(values)
    return fields


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kinds = FieldDescriptor
    if field.type in (kinds.TYPE_INT32, kinds.TYPE_SINT32, kinds.TYPE_SFIXED32):
        return st.one_of(st.sampled_from([0, 1, -1, 4, 16, 159, 160, INT32_MAX, INT32_MIN]), st.integers(INT32_MIN, INT32_MAX))
    if field.type in (kinds.TYPE_INT64, kinds.TYPE_SINT64, kinds.TYPE_SFIXED64):
        return st.one_of(st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63)]), st.integers(-(2**63), 2**63 - 1))
    if field.type in (kinds.TYPE_UINT32, kinds.TYPE_FIXED32):
        return st.one_of(st.sampled_from([0, 1, 3, 2**32 - 1]), st.integers(0, 2**32 - 1))
    if field.type in (kinds.TYPE_UINT64, kinds.TYPE_FIXED64):
        return st.one_of(st.sampled_from([0, 1, 2**64 - 1]), st.integers(0, 2**64 - 1))
    if field.type in (kinds.TYPE_FLOAT, kinds.TYPE_DOUBLE):
        return edge_floats()
    if field.type == kinds.TYPE_BOOL:
        return st.booleans()
    if field.type == kinds.TYPE_STRING:
        return odd_text(24, utf8=True)
    if field.type == kinds.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == kinds.TYPE_ENUM:
        return st.sampled_from([value.number for value in field.enum_type.values])
    raise TypeError(f"no strategy for {field.full_name}")
