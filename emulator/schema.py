"""Optional table schemas of pipes: rows that violate them become row errors, as on the service.

The live service accepts an append whose rows the table rejects (a NOT NULL column given null, a
value of the wrong type): the commit succeeds, the committed offset moves past the rows, and only
`rows_error_count` and `last_error_message` show them. A pipe without a schema accepts every JSON
object. Columns come from `--pipe 'DB.SCHEMA.PIPE(ID NUMBER NOT NULL, NAME VARCHAR)'` or from
`POST /_emulator/pipes` with `"columns": [{"name": "ID", "type": "NUMBER", "nullable": false}]`.

Row keys match column names ignoring case (unquoted identifiers); keys without a column are
ignored, and a column the row lacks is null.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from emulator.ndjson import ParsedRows, RejectedRow

# Snowflake's messages for these row errors (the NOT NULL one as recorded from the service).
NULL_MESSAGE = "NULL result in a non-nullable column"


@dataclass(frozen=True, slots=True)
class RowProblem:
    """Why the table rejects a row: Snowflake's code, message and SQL state, and the column."""

    code: int
    message: str
    sql_state: str
    column: str

_NUMBER = frozenset(
    {"NUMBER", "NUMERIC", "DECIMAL", "INT", "INTEGER", "BIGINT", "SMALLINT", "TINYINT",
     "BYTEINT", "FLOAT", "FLOAT4", "FLOAT8", "DOUBLE", "REAL"}
)
_TEXT = frozenset({"VARCHAR", "STRING", "TEXT", "CHAR", "CHARACTER"})
_TIME = frozenset(
    {"TIMESTAMP", "TIMESTAMP_NTZ", "TIMESTAMP_LTZ", "TIMESTAMP_TZ", "DATETIME", "DATE", "TIME"}
)
_BOOLEAN_TEXT = frozenset(
    {"true", "false", "t", "f", "yes", "no", "y", "n", "on", "off", "1", "0"}
)
TYPES = _NUMBER | _TEXT | _TIME | {"BOOLEAN", "VARIANT", "OBJECT", "ARRAY"}
_COLUMN_RE = re.compile(
    r"^\s*(?P<name>\"[^\"]+\"|[A-Za-z_][A-Za-z0-9_$]*)\s+(?P<type>[A-Za-z_0-9]+)"
    r"(?:\s*\([0-9,\s]*\))?(?P<notnull>\s+NOT\s+NULL)?\s*$",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a pipe's table."""

    name: str  # upper-cased unless it was quoted
    type: str  # one of TYPES, upper case
    nullable: bool = True

    def as_json(self) -> dict[str, Any]:
        """The column as the admin API shows it."""
        return {"name": self.name, "type": self.type, "nullable": self.nullable}


def column(name: str, type_: str, nullable: bool = True) -> Column:
    """A Column; ValueError naming the problem for an empty name or an unknown type."""
    if not name.strip():
        raise ValueError("a column needs a non-empty name")
    kind = type_.strip().upper()
    if kind not in TYPES:
        raise ValueError(
            f"column {name}: unknown type {type_!r}; use one of {', '.join(sorted(TYPES))}"
        )
    quoted = len(name) >= 2 and name.startswith('"') and name.endswith('"')
    return Column(name[1:-1] if quoted else name.strip().upper(), kind, nullable)


def parse_columns(text: str) -> list[Column]:
    """Columns from `ID NUMBER NOT NULL, NAME VARCHAR(100)`; ValueError naming the bad part."""
    columns = []
    for part in _split(text):
        match = _COLUMN_RE.match(part)
        if match is None:
            raise ValueError(
                f"column definition {part.strip()!r} is not NAME TYPE [NOT NULL] "
                "(e.g. ID NUMBER NOT NULL)"
            )
        columns.append(column(match["name"], match["type"], nullable=not match["notnull"]))
    if not columns:
        raise ValueError("a schema needs at least one column (or leave the parentheses out)")
    return columns


def _split(text: str) -> list[str]:
    # Commas inside a type's parentheses (NUMBER(38,0)) do not separate columns.
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current)
    return [p for p in parts if p.strip()]


def columns_from_json(data: object) -> list[Column]:
    """Columns from the admin API's `[{"name", "type", "nullable"}]`; ValueError otherwise."""
    if not isinstance(data, list) or not data:
        raise ValueError('columns must be a non-empty list of {"name", "type", "nullable"}')
    out = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError('each column must be {"name": str, "type": str, "nullable": bool}')
        nullable = item.get("nullable", True)
        if not isinstance(nullable, bool):
            raise ValueError(f"column {item['name']}: nullable must be true or false")
        out.append(column(item["name"], str(item.get("type", "")), nullable))
    return out


def row_error(row: dict[str, Any], columns: Sequence[Column]) -> RowProblem | None:
    """The first way `row` violates the table (Snowflake's code and message), or None."""
    values = {k.upper(): v for k, v in row.items()}
    values.update(row)  # exact (quoted) names win over the case-folded ones
    for col in columns:
        value = values.get(col.name)
        if value is None:
            if not col.nullable:
                return RowProblem(100072, NULL_MESSAGE, "22000", col.name)
            continue
        problem = _type_error(col.type, value)
        if problem is not None:
            code, state, message = problem
            return RowProblem(code, message, state, col.name)
    return None


def _show(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _numeric(value: Any) -> bool:
    if isinstance(value, int | float):
        return True
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return False
        return True
    return False


def _boolean(value: Any) -> bool:
    if isinstance(value, bool | int | float):
        return True
    return isinstance(value, str) and value.strip().lower() in _BOOLEAN_TEXT


def _temporal(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return True
    if not isinstance(value, str):
        return False
    try:
        datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


# Per type family: whether a JSON value fits, and Snowflake's code, SQL state and message when it
# does not (the codes as Snowflake reports these conversion errors).
_CHECKS: dict[str, tuple[Callable[[Any], bool], int, str, str]] = {
    "number": (_numeric, 100038, "22018", "Numeric value '{}' is not recognized"),
    "text": (
        lambda v: not isinstance(v, dict | list), 100071, "22000",
        "Failed to cast variant value {} to VARCHAR",
    ),
    "BOOLEAN": (_boolean, 100037, "22018", "Boolean value '{}' is not recognized"),
    "time": (_temporal, 100035, "22007", "Timestamp '{}' is not recognized"),
    "OBJECT": (
        lambda v: isinstance(v, dict), 100071, "22000", "Failed to cast variant value {} to OBJECT"
    ),
    "ARRAY": (
        lambda v: isinstance(v, list), 100071, "22000", "Failed to cast variant value {} to ARRAY"
    ),
    "VARIANT": (lambda v: True, 0, "", ""),
}


def _family(kind: str) -> str:
    if kind in _NUMBER:
        return "number"
    if kind in _TEXT:
        return "text"
    if kind in _TIME:
        return "time"
    return kind


def _type_error(kind: str, value: Any) -> tuple[int, str, str] | None:
    fits, code, state, message = _CHECKS[_family(kind)]
    return None if fits(value) else (code, state, message.format(_show(value)))


def apply(rows: ParsedRows, columns: Sequence[Column]) -> ParsedRows:
    """`rows` with those the table rejects moved to the errors (their positions kept)."""
    positions = rows.good_positions or list(range(len(rows.good)))
    good: list[bytes] = []
    kept: list[int] = []
    errors, first_error = rows.errors, rows.first_error
    rejected = list(rows.rejected)
    for line, pos in zip(rows.good, positions, strict=True):
        problem = row_error(orjson.loads(line), columns)
        if problem is None:
            good.append(line)
            kept.append(pos)
            continue
        errors += 1
        rejected.append(
            RejectedRow(pos, line, problem.code, problem.message, problem.sql_state, problem.column)
        )
        if first_error is None:
            first_error = problem.message
    if errors == rows.errors:
        return rows
    rejected.sort(key=lambda r: r.position)
    return ParsedRows(
        good=good,
        good_positions=kept,
        total=rows.total,
        errors=errors,
        first_error=first_error,
        rejected=rejected,
    )
