"""Database, schema and pipe names: Snowflake's identifier rules, the worker's own, one spelling.

Every batch names its target with three identifiers. `check_name` accepts a name only if
Snowflake would (docs/message-format.md#names) and the worker can carry it safely:

- **unquoted**: starts with a letter (A-Z, a-z) or `_`, then letters, digits, `_` and `$`, at
  most 255 characters. Snowflake stores and resolves it upper-cased: `events` is `EVENTS`;
- **a table's default pipe**, `<TABLE>-STREAMING` with an unquoted table name (the pipe Snowflake
  creates for every table): resolved upper-cased like an unquoted name;
- **quoted**: `"..."`, with `""` for a double quote inside; any characters, case kept, at most 255
  of them between the quotes;
- and for every name: not empty, no control character, no `|` (the state store's channel keys
  join names with it), no `.` (the worker names a pipe `DATABASE.SCHEMA.PIPE`, and `.` or `..`
  in a request path would be read as a path step).

`canonical_name` is the one spelling of a name, the way Snowflake resolves it: unquoted names
upper-cased, a quoted name that needs no quotes (`"EVENTS"`) without them, any other quoted
name in quotes with `""` inside. The worker logs a batch under the canonical names, so every
spelling of one pipe shares its channels (two spellings would otherwise open the same Snowflake
channel from two logs). `SNOWPIPE_PIPES` is read the same way (`parse_pipe_list`).

This module imports only the standard library and the error tree.
"""

from __future__ import annotations

import functools
import re

from worker.errors import InvalidNameError

__all__ = [
    "MAX_NAME_CHARS",
    "canonical_name",
    "canonical_target",
    "check_name",
    "parse_pipe_list",
    "pipe_label",
]

# Snowflake: "the maximum number of characters allowed is 255", quoted or not.
MAX_NAME_CHARS = 255
# The default pipe of a table T is named T-STREAMING.
DEFAULT_PIPE_SUFFIX = "-STREAMING"
# What the state store's channel keys join names with (worker/delivery/channels.py).
KEY_SEPARATOR = "|"

_UNQUOTED = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DEFAULT_PIPE = re.compile(r"([A-Za-z_][A-Za-z0-9_$]*)-STREAMING", re.IGNORECASE)
_FIX_QUOTED = 'put any other name in double quotes, e.g. "my-pipe" (with "" for a quote inside)'


def _unquoted_problem(kind: str, value: str) -> str | None:
    """Why `value` is not an unquoted name of `kind` (None if it is one)."""
    if kind == "pipe":
        default = _DEFAULT_PIPE.fullmatch(value)
        if default is not None:
            table = default.group(1)
            if len(table) > MAX_NAME_CHARS:
                return (
                    f"pipe {value!r} names a table of {len(table)} characters: Snowflake "
                    f"allows {MAX_NAME_CHARS}"
                )
            return None
    if _UNQUOTED.fullmatch(value) is None:
        return (
            f"{kind} {value!r} is not a valid Snowflake identifier: an unquoted name starts "
            "with a letter or _ and has only letters, digits, _ and $; " + _FIX_QUOTED
        )
    if len(value) > MAX_NAME_CHARS:
        return f"{kind} name is {len(value)} characters long: Snowflake allows {MAX_NAME_CHARS}"
    return None


def _unquote(kind: str, value: str) -> str:
    """The name between the quotes of `value` (`""` read as `"`), or InvalidNameError."""
    inner = value[1:-1] if len(value) >= 2 and value.endswith('"') else None
    if inner is None:
        raise InvalidNameError(
            f"{kind} {value!r} opens a double quote it does not close: write a quoted name "
            'as "name"'
        )
    if '"' in inner.replace('""', ""):
        raise InvalidNameError(
            f'{kind} {value!r} has a lone double quote inside: write a quote inside a quoted '
            'name as two ("")'
        )
    name = inner.replace('""', '"')
    if not name.strip():
        raise InvalidNameError(f"{kind} {value!r} is empty between its quotes: name the object")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidNameError(
            f"{kind} name is {len(name)} characters long between its quotes: Snowflake allows "
            f"{MAX_NAME_CHARS}"
        )
    return name


def check_name(kind: str, value: object) -> str:
    """`value` if it is a valid name for the `kind` of object (database, schema, pipe); else
    InvalidNameError naming the rule it breaks and the fix (see the module docstring)."""
    if not isinstance(value, str):
        raise InvalidNameError(
            f"{kind} must be a string (the object's name), got {type(value).__name__}"
        )
    if _UNQUOTED.fullmatch(value) is not None and len(value) <= MAX_NAME_CHARS:
        return value  # the common case: a plain unquoted name
    if not value.strip():
        raise InvalidNameError(f"{kind} is empty: name the Snowflake {kind} to load into")
    if _CONTROL.search(value) is not None:
        raise InvalidNameError(
            f"{kind} {value!r} contains a control character (tab, newline, ...): use the "
            "object's plain name"
        )
    if KEY_SEPARATOR in value:
        raise InvalidNameError(
            f"{kind} {value!r} contains '|', which the worker's state store uses to join names "
            "in its keys: load into an object whose name has no '|'"
        )
    name = _unquote(kind, value) if value.startswith('"') else value
    if "." in name:
        what = "is a path step" if name in (".", "..") else "contains '.'"
        raise InvalidNameError(
            f"{kind} {value!r} {what}: give the {kind}'s own name (database, schema and pipe "
            "are separate arguments, and the worker joins them with '.')"
        )
    if not value.startswith('"'):
        problem = _unquoted_problem(kind, value)
        if problem is not None:
            raise InvalidNameError(problem)
    return value


def canonical_name(kind: str, value: object) -> str:
    """The one spelling of a valid name (see the module docstring); InvalidNameError if it is
    not valid."""
    checked = check_name(kind, value)
    if not checked.startswith('"'):
        return checked.upper()
    name = _unquote(kind, checked)
    if name == name.upper() and _unquoted_problem(kind, name) is None:
        return name  # "EVENTS" is the same object as EVENTS
    return '"' + name.replace('"', '""') + '"'


def canonical_target(database: object, schema: object, pipe: object) -> tuple[str, str, str]:
    """(database, schema, pipe) in their canonical spelling, or InvalidNameError."""
    return (
        canonical_name("database", database),
        canonical_name("schema", schema),
        canonical_name("pipe", pipe),
    )


def pipe_label(database: str, schema: str, pipe: str) -> str:
    """`DATABASE.SCHEMA.PIPE` (names cannot contain `.`, so the label is unambiguous)."""
    return f"{database}.{schema}.{pipe}"


@functools.lru_cache(maxsize=16)  # read on every batch: the setting's text is parsed once
def parse_pipe_list(text: str) -> frozenset[tuple[str, str, str]]:
    """The pipes of a `DB.SCHEMA.PIPE,...` list (SNOWPIPE_PIPES), canonical; InvalidNameError
    naming the entry that is not three valid names."""
    pipes: set[tuple[str, str, str]] = set()
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        parts = entry.split(".")
        if len(parts) != 3:
            raise InvalidNameError(
                f"{entry!r} is not DATABASE.SCHEMA.PIPE: list pipes as DB.SCHEMA.PIPE, "
                "comma-separated"
            )
        try:
            pipes.add(canonical_target(*(part.strip() for part in parts)))
        except InvalidNameError as exc:
            raise InvalidNameError(f"{entry!r}: {exc}") from None
    return frozenset(pipes)
