"""The stream record's schema (services/streams/record.py) is the one place its field names are written: the stream
scripts take them from it, the Python that reads a record reads only names it declares, and (tests/conftest.py,
`redis_client`) every record a test leaves in Redis has only declared fields."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from services.lua import ScriptSpec
from services.streams import scripts
from services.streams.record import FIELDS, F, lua

ROOT = Path(__file__).parent.parent
SCRIPTS = ROOT / "services" / "streams" / "scripts.py"
# Quoted words the stream scripts use as values, not as field names (a status, an outcome, a close reason...).
# 'response_url' is both: the way an answer went (`delivered`) is named after the field that holds that URL.
VALUES_NAMED_AS_FIELDS = {"response_url"}


def _lua_sources() -> list[str]:
    """The Lua of scripts.py as it is written: every triple-quoted string but the module's docstring."""
    return SCRIPTS.read_text().split('"""')[3::2]


def test_the_stream_scripts_write_no_field_name_of_their_own():
    quoted = {word for source in _lua_sources() for word in re.findall(r"'([a-z_][a-z0-9_]*)'", source)}
    assert quoted & FIELDS.keys() <= VALUES_NAMED_AS_FIELDS, "write F.<field> for a field of the stream record"
    dotted = {word for source in _lua_sources() for word in re.findall(r"\b[a-z]\.([a-z_][a-z0-9_]*)", source)}
    assert not dotted & FIELDS.keys(), "read a table of the record's fields as f[F.<field>]"


def test_the_fields_a_script_reads_into_h_are_the_records():
    specs = [value for value in vars(scripts).values() if isinstance(value, ScriptSpec)]
    assert specs
    for spec in specs:
        assert set(spec.hash_fields) <= FIELDS.keys(), spec.name


def test_a_field_the_schema_does_not_name_fails_the_script_when_it_is_made():
    assert lua("redis.call('HGET', KEYS[1], F.status)") == "redis.call('HGET', KEYS[1], 'status')"
    with pytest.raises(ValueError, match="'statsu' is not a field of the stream record"):
        lua("redis.call('HGET', KEYS[1], F.statsu)")


def _meta_reads(tree: ast.AST) -> set[str]:
    """The names read from a record held as `meta` (meta["x"], meta.get("x"), "x" in meta), and those a command on a
    stream's hash names (client.hget(keys.stream(id), "x"))."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and _is_meta(node.value):
            names.add(_constant(node.slice))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            names.add(_constant(node.args[0]) if _is_meta(node.func.value) and node.args else "")
        elif isinstance(node, ast.Compare) and any(_is_meta(right) for right in node.comparators):
            names.add(_constant(node.left))
        elif isinstance(node, ast.Call) and _on_a_stream_hash(node):
            names |= {_constant(arg) for arg in node.args[1:]}
            names |= {
                _constant(item) for arg in node.args[1:] if isinstance(arg, ast.List | ast.Tuple) for item in arg.elts
            }
    return names - {""}


def _on_a_stream_hash(call: ast.Call) -> bool:
    """client.hget(keys.stream(id), "x"), and hmget, hincrby, hsetnx, hdel, hset the same way."""
    command = call.func.attr if isinstance(call.func, ast.Attribute) else ""
    key = call.args[0] if call.args else None
    named = isinstance(key, ast.Call) and isinstance(key.func, ast.Attribute) and key.func.attr == "stream"
    return command in {"hget", "hmget", "hincrby", "hsetnx", "hdel", "hset"} and named


def _constant(node: ast.AST) -> str:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else ""


def _is_meta(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "meta"


def test_the_python_that_reads_a_record_takes_its_field_names_from_the_schema():
    """A record read as `meta` (or a command on a stream's hash) names its fields as F.<field>, never as a string:
    a misspelt name is then an error, not a read of nothing."""
    spelt: dict[str, set[str]] = {}
    for path in (ROOT / "services").rglob("*.py"):
        for name in _meta_reads(ast.parse(path.read_text())):
            spelt.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert not spelt, f"write F.<field> (services/streams/record.py) for these names read from a record: {spelt}"


def test_every_field_the_python_names_is_the_records():
    unknown: dict[str, set[str]] = {}
    for path in (ROOT / "services").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            named = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "F"
            if named and node.attr not in FIELDS:
                unknown.setdefault(node.attr, set()).add(str(path.relative_to(ROOT)))
    assert not unknown, f"F.<field> names no field of the stream record: {unknown}"


def test_a_misspelt_field_name_is_an_error():
    assert F.status == "status"
    with pytest.raises(AttributeError, match="'statsu' is not a field of the stream record"):
        F.statsu  # noqa: B018
