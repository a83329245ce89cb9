"""The small, strict subset of Snowflake SQL that the emulator's SQL API runs.

Three statements (docs/emulator.md#the-sql-api-subset):

    SELECT <items> FROM ERROR_TABLE(<[db.[schema.]]table>)
        [WHERE <predicate> [AND <predicate> ...]] [ORDER BY <expr> [ASC|DESC], ...]
        [LIMIT <n> [OFFSET <m>]]
    TRUNCATE [TABLE] [IF EXISTS] ERROR_TABLE(<table>)
    DESC[RIBE] PIPE <[db.[schema.]]pipe>

Items are `*`, the error table's columns, variant paths (`error_metadata:details:channel_name`,
`error_data:"$1"`, `x.y`, `x['y']`) with `::TYPE` casts, `TO_JSON(<expr>)`, `COUNT(*)` and
literals, each optionally `AS alias`. Predicates compare two expressions (`= != <> < <= > >=`),
test `IS [NOT] NULL` or `[NOT] IN (...)`; operands may be literals or `?` bindings.

Anything else answers with the error Snowflake gives for it where that is known: a command the SQL
API refuses (`USE`, `BEGIN`, `PUT`, ...) is `391911`, another statement kind `000002`
(unsupported feature), a syntax error `001003`, an unknown column `000904`. The parser is a
recursive descent over a tokenizer; it does not try to be a SQL engine.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

from emulator.storage import ErrorRow

# Snowflake's answers (docs/emulator.md#errors-of-the-sql-api).
SUCCESS_MESSAGE = "Statement executed successfully."


class SqlError(Exception):
    """A statement that fails: HTTP status, Snowflake's code, SQL state and message."""

    def __init__(
        self, status: int, code: str, sql_state: str, message: str, *, reason: str = ""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.sql_state = sql_state
        self.message = message
        self.reason = reason or message


def syntax_error(token: Token, *, reason: str) -> SqlError:
    """001003: Snowflake's syntax error naming the unexpected token and its position."""
    shown = "end of input" if token.kind == "eof" else token.text
    return SqlError(
        422, "001003", "42000",
        f"SQL compilation error:\nsyntax error line {token.line} at position {token.column} "
        f"unexpected '{shown}'.",
        reason=reason,
    )


def unsupported(feature: str, *, reason: str) -> SqlError:
    """000002: Snowflake's answer for a feature it does not support."""
    return SqlError(
        422, "000002", "0A000", f"SQL compilation error:\nUnsupported feature '{feature}'.",
        reason=reason,
    )


SUBSET = (
    "the emulator runs SELECT ... FROM ERROR_TABLE(<table>), TRUNCATE TABLE ERROR_TABLE(<table>) "
    "and DESCRIBE PIPE <pipe> (docs/emulator.md#the-sql-api-subset)"
)

# -- tokens -------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<comment>--[^\n]*|//[^\n]*|/\*.*?\*/)
  | (?P<string>'(?:[^'\\]|''|\\.)*')
  | (?P<qident>"(?:[^"]|"")*")
  | (?P<number>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_$]*)
  | (?P<op>::|!=|<>|<=|>=|[=<>:.,()*\[\];?])
    """,
    re.VERBOSE | re.DOTALL,
)


@dataclass(frozen=True, slots=True)
class Token:
    """One token: kind (`ident`, `qident`, `string`, `number`, `op`, `eof`), text, position."""

    kind: str
    text: str
    line: int
    column: int
    index: int = 0  # binding number for `?`

    def word(self) -> str:
        """The upper-cased text of an unquoted identifier ('' for anything else)."""
        return self.text.upper() if self.kind == "ident" else ""


def tokenize(text: str) -> list[Token]:
    """The statement's tokens; 001003 for a character no token starts with."""
    tokens: list[Token] = []
    pos, line, line_start, params = 0, 1, 0, 0
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if match is None:
            bad = Token("op", text[pos], line, pos - line_start)
            raise syntax_error(bad, reason=f"unexpected character {text[pos]!r}")
        kind = match.lastgroup or ""
        value = match.group()
        if kind not in ("ws", "comment"):
            index = 0
            if value == "?":
                params += 1
                index = params
            tokens.append(Token(kind, value, line, pos - line_start, index))
        newlines = value.count("\n")
        if newlines:
            line += newlines
            line_start = pos + value.rindex("\n") + 1
        pos = match.end()
    tokens.append(Token("eof", "", line, pos - line_start))
    return tokens


def identifier(token: Token) -> str:
    """An identifier as Snowflake resolves it: quoted keeps its case, unquoted is upper-cased."""
    if token.kind == "qident":
        return token.text[1:-1].replace('""', '"')
    return token.text.upper()


def quote(name: str) -> str:
    """`name` as SQL text: bare when it reads back as itself, double-quoted otherwise."""
    if re.fullmatch(r"[A-Z_][A-Z0-9_$]*", name):
        return name
    return '"' + name.replace('"', '""') + '"'


# -- values -------------------------------------------------------------------------------------

# SQL types of the results (the `type` of Snowflake's rowType).
TEXT, FIXED, REAL, BOOLEAN, TIMESTAMP, VARIANT, OBJECT = (
    "text", "fixed", "real", "boolean", "timestamp_ltz", "variant", "object",
)


class _JsonNull:
    """A JSON null inside a variant (SQL NULL is None)."""

    def __repr__(self) -> str:
        return "JSON_NULL"


JSON_NULL = _JsonNull()


@dataclass(frozen=True, slots=True)
class Value:
    """A typed SQL value; `value` None is SQL NULL."""

    type: str
    value: Any


NULL_TEXT = Value(TEXT, None)


def variant(value: Any) -> Value:
    """A variant value from JSON data (JSON null kept apart from SQL NULL)."""
    return Value(VARIANT, JSON_NULL if value is None else value)


def pretty_json(value: Any) -> str:
    """JSON text as Snowflake shows OBJECT and VARIANT values: 2-space indent, sorted keys."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)


def compact_json(value: Any) -> str:
    """JSON text as TO_JSON writes it: no spaces, sorted keys."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def _json_value(v: Value) -> Any:
    return None if v.value is JSON_NULL else v.value


def _render_timestamp(ns: Any) -> str:
    ns = int(ns)
    return f"{ns // 10**9}.{ns % 10**9:09d}"


_RENDER: dict[str, Callable[[Any], str]] = {
    BOOLEAN: lambda raw: "true" if raw else "false",
    TIMESTAMP: _render_timestamp,
    REAL: lambda raw: repr(float(raw)),
}


def render(v: Value) -> str | None:
    """The value as the SQL API sends it: a string, or None for SQL NULL."""
    if v.value is None:
        return None
    if v.type in (VARIANT, OBJECT):
        return pretty_json(_json_value(v))
    return _RENDER.get(v.type, str)(v.value)


def _number(text: str, *, source: str = "") -> Decimal:
    try:
        number = Decimal(text.strip())
    except InvalidOperation:
        raise SqlError(
            422, "100038", "22018", f"Numeric value '{text}' is not recognized",
            reason=f"{source or 'a value'} is not a number",
        ) from None
    if not number.is_finite():
        raise SqlError(422, "100038", "22018", f"Numeric value '{text}' is not recognized")
    return number


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "t", "yes", "y", "on", "1"):
        return True
    if lowered in ("false", "f", "no", "n", "off", "0"):
        return False
    raise SqlError(422, "100037", "22018", f"Boolean value '{text}' is not recognized")


def _timestamp(text: str) -> int:
    try:
        when = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise SqlError(
            422, "100035", "22007", f"Timestamp '{text}' is not recognized",
            reason="compare timestamp with an ISO 8601 text or a TIMESTAMP_LTZ binding",
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    delta = when - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    return (delta.days * 86400 + delta.seconds) * 10**9 + delta.microseconds * 1000


def _cast_failure(raw: Any, target: str) -> SqlError:
    return SqlError(
        422, "100071", "22000", f"Failed to cast variant value {compact_json(raw)} to {target}"
    )


def _to_text(v: Value) -> Any:
    raw = v.value
    if v.type in (VARIANT, OBJECT):
        return raw if isinstance(raw, str) else _scalar_text(raw)
    if v.type == TIMESTAMP:
        when = datetime.datetime.fromtimestamp(raw / 10**9, tz=datetime.UTC)
        return when.strftime("%Y-%m-%d %H:%M:%S.") + f"{when.microsecond // 1000:03d} +0000"
    return render(v)


def _to_fixed(v: Value) -> Any:
    raw = v.value
    if isinstance(raw, bool):
        return Decimal(int(raw))
    if isinstance(raw, int | Decimal):
        return Decimal(raw)
    if isinstance(raw, float):
        return Decimal(repr(raw))
    if isinstance(raw, str):
        return _number(raw)
    raise _cast_failure(raw, "FIXED")


def _to_boolean(v: Value) -> Any:
    raw = v.value
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int | float | Decimal):
        return raw != 0
    if isinstance(raw, str):
        return _boolean(raw)
    raise _cast_failure(raw, "BOOLEAN")


def _to_object(v: Value) -> Any:
    if isinstance(v.value, dict):
        return v.value
    raise _cast_failure(v.value, "OBJECT")


_CAST: dict[str, Callable[[Value], Any]] = {
    TEXT: _to_text, FIXED: _to_fixed, BOOLEAN: _to_boolean, OBJECT: _to_object,
}


def cast(v: Value, target: str) -> Value:
    """`v::target` for the types the subset knows."""
    if v.value is None or v.value is JSON_NULL:
        return Value(target, None)
    if target in (v.type, VARIANT):
        return Value(target, v.value)
    convert = _CAST.get(target)
    if convert is None:
        raise unsupported(f"cast to {target}", reason=f"casts to {target} are outside the subset")
    return Value(target, convert(v))


def _scalar_text(raw: Any) -> str:
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, dict | list):
        return compact_json(raw)
    return str(raw)


def _comparable(v: Value) -> Any:
    """A Python value that orders like the SQL value (None for NULL)."""
    raw = v.value
    if raw is None or raw is JSON_NULL:
        return None
    if v.type in (VARIANT, OBJECT):
        if isinstance(raw, bool | str):
            return raw
        if isinstance(raw, int | float | Decimal):
            return Decimal(repr(raw)) if isinstance(raw, float) else Decimal(raw)
        return compact_json(raw)
    if v.type in (FIXED, REAL):
        return raw if isinstance(raw, Decimal) else Decimal(repr(raw))
    return raw


def _coerce(a: Any, a_type: str, b: Any, b_type: str) -> tuple[Any, Any]:
    """Both sides of a comparison as one Python type (Snowflake's implicit casts)."""
    if type(a) is type(b) or (isinstance(a, Decimal) and isinstance(b, Decimal)):
        return a, b
    if isinstance(a, bool) or isinstance(b, bool):
        other = b if isinstance(a, bool) else a
        if isinstance(other, str):
            flag = _boolean(other)
            return (a, flag) if isinstance(a, bool) else (flag, b)
    if TIMESTAMP in (a_type, b_type):
        ts_a = a if a_type == TIMESTAMP else _timestamp(str(a))
        ts_b = b if b_type == TIMESTAMP else _timestamp(str(b))
        return ts_a, ts_b
    if isinstance(a, Decimal) and isinstance(b, str):
        return a, _number(b)
    if isinstance(b, Decimal) and isinstance(a, str):
        return _number(a), b
    raise SqlError(
        422, "002016", "22000",
        f"SQL compilation error:\nCannot compare values of types {a_type.upper()} and "
        f"{b_type.upper()}.",
        reason="cast one side (::STRING, ::NUMBER, ::BOOLEAN) so both have one type",
    )


_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: bool(a == b),
    "!=": lambda a, b: bool(a != b),
    "<>": lambda a, b: bool(a != b),
    "<": lambda a, b: bool(a < b),
    "<=": lambda a, b: bool(a <= b),
    ">": lambda a, b: bool(a > b),
    ">=": lambda a, b: bool(a >= b),
}


def compare(op: str, left: Value, right: Value) -> bool:
    """`left op right` with SQL semantics: anything compared with NULL is not true."""
    a, b = _comparable(left), _comparable(right)
    if a is None or b is None:
        return False
    a, b = _coerce(a, left.type, b, right.type)
    return _COMPARE[op](a, b)


# -- bindings -----------------------------------------------------------------------------------

_BINDING_TYPES = {
    "TEXT": TEXT, "FIXED": FIXED, "REAL": REAL, "BOOLEAN": BOOLEAN,
    "TIMESTAMP_LTZ": TIMESTAMP, "TIMESTAMP_NTZ": TIMESTAMP, "TIMESTAMP_TZ": TIMESTAMP,
}


def binding_value(name: str, spec: object) -> Value:
    """A binding `{"type": ..., "value": ...}` as a typed value (422 for what cannot bind)."""
    if not isinstance(spec, dict) or "type" not in spec or not isinstance(spec["type"], str):
        raise SqlError(
            422, "002049", "42601",
            f'SQL compilation error:\nBinding {name} must be {{"type": "TEXT", "value": "..."}}.',
        )
    kind = spec["type"].upper()
    raw = spec.get("value")
    if kind not in _BINDING_TYPES:
        raise SqlError(
            422, "002040", "42601", f"SQL compilation error:\nUnsupported data type '{kind}'.",
            reason="bind TEXT, FIXED, REAL, BOOLEAN or TIMESTAMP_LTZ values",
        )
    if raw is None:
        return Value(_BINDING_TYPES[kind], None)
    if isinstance(raw, list):
        raise unsupported("array binding", reason="array bindings (batch DML) are not supported")
    if not isinstance(raw, str):
        raise SqlError(
            422, "002086", "22000",
            f"SQL compilation error:\nBinding {name} of type {kind} must be a string value.",
        )
    sql_type = _BINDING_TYPES[kind]
    if sql_type in (FIXED, REAL):
        return Value(sql_type, _number(raw, source=f"binding {name}"))
    if sql_type == BOOLEAN:
        return Value(BOOLEAN, _boolean(raw))
    if sql_type == TIMESTAMP:
        # The SQL API binds timestamps as nanoseconds since the epoch (`<ns> <offset>` for _TZ).
        return Value(TIMESTAMP, int(_number(raw.split()[0], source=f"binding {name}")))
    return Value(TEXT, raw)


# -- expressions --------------------------------------------------------------------------------

Row = dict[str, Value]
COLUMNS = ("TIMESTAMP", "QUERY_ID", "ERROR_CODE", "ERROR_METADATA", "ERROR_DATA")
COLUMN_TYPES = {
    "TIMESTAMP": TIMESTAMP, "QUERY_ID": TEXT, "ERROR_CODE": FIXED,
    "ERROR_METADATA": OBJECT, "ERROR_DATA": OBJECT,
}


def error_table_row(row: ErrorRow) -> Row:
    """An error-table row as typed column values."""
    return {
        "TIMESTAMP": Value(TIMESTAMP, row.timestamp_ns),
        "QUERY_ID": Value(TEXT, row.query_id),
        "ERROR_CODE": Value(FIXED, Decimal(row.error_code)),
        "ERROR_METADATA": Value(OBJECT, row.error_metadata),
        "ERROR_DATA": Value(OBJECT, row.error_data),
    }


class Expr(Protocol):
    """A compiled expression: its result type, its column name, and how to evaluate it."""

    name: str

    @property
    def type(self) -> str:
        """The SQL type of the expression's values."""
        ...

    def eval(self, row: Row) -> Value:
        """The expression's value for one row."""
        ...


@dataclass
class Literal:
    """A constant (or a binding)."""

    value: Value
    name: str

    @property
    def type(self) -> str:
        """The literal's SQL type."""
        return self.value.type

    def eval(self, row: Row) -> Value:
        """The constant."""
        return self.value


@dataclass
class Column:
    """One of the error table's columns."""

    column: str
    name: str

    @property
    def type(self) -> str:
        """The column's SQL type."""
        return COLUMN_TYPES[self.column]

    def eval(self, row: Row) -> Value:
        """The column's value."""
        return row[self.column]


@dataclass
class Path:
    """`column:key.key[...]`: an element of an OBJECT column, as a variant (NULL if absent)."""

    column: str
    keys: list[str | int]
    name: str
    type: str = VARIANT

    def eval(self, row: Row) -> Value:
        """The element, or SQL NULL when a key is missing."""
        node: Any = row[self.column].value
        for key in self.keys:
            if isinstance(key, int):
                if not isinstance(node, list) or not -len(node) <= key < len(node):
                    return Value(VARIANT, None)
                node = node[key]
            else:
                if not isinstance(node, dict) or key not in node:
                    return Value(VARIANT, None)
                node = node[key]
        return variant(node)


@dataclass
class Cast:
    """`expr::TYPE`."""

    inner: Expr
    type: str
    name: str

    def eval(self, row: Row) -> Value:
        """The inner value cast."""
        return cast(self.inner.eval(row), self.type)


@dataclass
class ToJson:
    """`TO_JSON(expr)`: compact JSON text of a variant or object."""

    inner: Expr
    name: str
    type: str = TEXT

    def eval(self, row: Row) -> Value:
        """The JSON text (NULL stays NULL)."""
        v = self.inner.eval(row)
        if v.value is None:
            return NULL_TEXT
        if v.type in (VARIANT, OBJECT):
            return Value(TEXT, compact_json(_json_value(v)))
        if v.type in (TEXT, BOOLEAN):
            return Value(TEXT, compact_json(v.value))
        shown = render(v) or ""
        return Value(TEXT, shown if v.type in (FIXED, REAL) else compact_json(shown))


@dataclass
class CountStar:
    """`COUNT(*)` (the whole select list, no GROUP BY)."""

    name: str = "COUNT(*)"
    type: str = FIXED

    def eval(self, row: Row) -> Value:
        """Not evaluated per row: the statement counts."""
        raise AssertionError("COUNT(*) is computed over the rows")


@dataclass
class Predicate:
    """One condition of the WHERE clause."""

    test: Callable[[Row], bool]

    def __call__(self, row: Row) -> bool:
        """Whether `row` passes."""
        return self.test(row)


# -- statements ---------------------------------------------------------------------------------


@dataclass
class OrderKey:
    """One ORDER BY item."""

    expr: Expr | None  # None: by output column `ordinal`
    ordinal: int = 0
    descending: bool = False
    nulls_first: bool | None = None


@dataclass
class Select:
    """A parsed SELECT over ERROR_TABLE(...)."""

    table: list[Token]
    items: list[Expr]  # empty: SELECT *
    star: bool
    where: list[Predicate] = field(default_factory=list)
    order: list[OrderKey] = field(default_factory=list)
    limit: int | None = None
    offset: int = 0


@dataclass
class Truncate:
    """TRUNCATE TABLE [IF EXISTS] ERROR_TABLE(...)."""

    table: list[Token]
    if_exists: bool


@dataclass
class DescribePipe:
    """DESC[RIBE] PIPE name."""

    pipe: list[Token]


Statement = Select | Truncate | DescribePipe

# First words of commands the SQL API itself refuses, and the name its message gives them.
_REFUSED = {
    "USE": "USE", "BEGIN": "TRANSACTION_BEGIN", "START": "TRANSACTION_BEGIN",
    "COMMIT": "TRANSACTION_COMMIT", "ROLLBACK": "TRANSACTION_ROLLBACK", "PUT": "PUT", "GET": "GET",
}
# Statement kinds Snowflake runs that the emulator does not.
_OTHER_STATEMENTS = frozenset(
    {"INSERT", "UPDATE", "DELETE", "MERGE", "CREATE", "ALTER", "DROP", "SHOW", "COPY", "CALL",
     "GRANT", "REVOKE", "WITH", "EXPLAIN", "LIST", "LS", "REMOVE", "RM", "UNDROP", "UNSET", "SET",
     "EXECUTE", "COMMENT", "VALUES", "TABLE"}
)
_CASTS = {
    "STRING": TEXT, "VARCHAR": TEXT, "TEXT": TEXT, "CHAR": TEXT, "CHARACTER": TEXT,
    "NUMBER": FIXED, "NUMERIC": FIXED, "DECIMAL": FIXED, "INT": FIXED, "INTEGER": FIXED,
    "BIGINT": FIXED, "SMALLINT": FIXED, "BOOLEAN": BOOLEAN, "VARIANT": VARIANT, "OBJECT": OBJECT,
}


class Parser:
    """Recursive descent over the tokens of one statement."""

    def __init__(self, text: str, bindings: dict[str, Value]) -> None:
        self.tokens = tokenize(text)
        self.pos = 0
        self.bindings = bindings

    # -- token helpers --

    @property
    def tok(self) -> Token:
        """The current token."""
        return self.tokens[self.pos]

    def advance(self) -> Token:
        """Take the current token."""
        token = self.tokens[self.pos]
        if token.kind != "eof":
            self.pos += 1
        return token

    def at(self, *words: str) -> bool:
        """Whether the current token is one of these keywords or operators."""
        t = self.tok
        return (t.kind == "ident" and t.text.upper() in words) or (
            t.kind == "op" and t.text in words
        )

    def accept(self, *words: str) -> Token | None:
        """Take the current token if it is one of these."""
        return self.advance() if self.at(*words) else None

    def expect(self, word: str, *, reason: str) -> Token:
        """Take the current token, which must be `word`."""
        if not self.at(word):
            raise syntax_error(self.tok, reason=reason)
        return self.advance()

    # -- statements --

    def statement(self) -> Statement:
        """The one statement of the request."""
        first = self.tok
        if first.kind == "eof":
            raise SqlError(400, "000900", "42601", "SQL compilation error:\nEmpty SQL statement.")
        word = first.word()
        if word in _REFUSED:
            raise SqlError(
                422, "391911", "0A000", f"Command not supported by SQL API: {_REFUSED[word]}",
                reason="the SQL API runs each statement in its own session; qualify names instead",
            )
        if word == "SELECT":
            stmt: Statement = self.select()
        elif word == "TRUNCATE":
            stmt = self.truncate()
        elif word in ("DESC", "DESCRIBE"):
            stmt = self.describe()
        elif word in _OTHER_STATEMENTS:
            raise unsupported(word, reason=f"{word} statements are outside the subset: {SUBSET}")
        else:
            raise syntax_error(first, reason=f"not a statement the subset knows: {SUBSET}")
        self.end()
        return stmt

    def end(self) -> None:
        """Only `;` (and nothing after it) may follow the statement."""
        if self.accept(";") and self.tok.kind != "eof":
            segments: list[list[Token]] = [[]]
            for t in self.tokens[self.pos : -1]:
                if t.kind == "op" and t.text == ";":
                    segments.append([])
                else:
                    segments[-1].append(t)
            count = 1 + sum(1 for segment in segments if segment)
            raise SqlError(
                422, "000008", "0A000",
                f"Actual statement count {count} did not match the desired statement count 1.",
                reason="send one statement per request",
            )
        if self.tok.kind != "eof":
            raise syntax_error(
                self.tok,
                reason="expected WHERE, AND, ORDER BY, LIMIT or the end (no OR, GROUP BY, table "
                "aliases or joins in the subset)",
            )

    def select(self) -> Select:
        """SELECT items FROM ERROR_TABLE(name) [WHERE ...] [ORDER BY ...] [LIMIT n [OFFSET m]]."""
        self.expect("SELECT", reason="expected SELECT")
        if self.at("DISTINCT", "TOP"):
            raise unsupported(self.tok.text.upper(), reason=f"SELECT {self.tok.text} is outside "
                              "the subset")
        star = False
        items: list[Expr] = []
        if self.accept("*"):
            star = True
        else:
            items.append(self.item())
            while self.accept(","):
                items.append(self.item())
        if not self.at("FROM"):
            raise unsupported(
                "SELECT without FROM ERROR_TABLE",
                reason="a query must read from ERROR_TABLE(<table>): " + SUBSET,
            )
        self.advance()
        if not self.at("ERROR_TABLE"):
            source = self.tok.text.upper() or "nothing"
            raise unsupported(
                f"reading {source}", reason=f"only ERROR_TABLE(<table>) can be read: {SUBSET}"
            )
        select = Select(self.error_table(), items, star)
        self.clauses(select)
        if any(isinstance(i, CountStar) for i in items) and (len(items) > 1 or select.order):
            raise unsupported(
                "COUNT(*) with other items",
                reason="COUNT(*) must be the only item (no GROUP BY, no ORDER BY)",
            )
        return select

    def clauses(self, select: Select) -> None:
        """[WHERE ...] [ORDER BY ...] [LIMIT n [OFFSET m]]."""
        if self.accept("WHERE"):
            select.where.append(self.predicate())
            while self.accept("AND"):
                select.where.append(self.predicate())
            if self.at("OR"):
                raise syntax_error(self.tok, reason="OR is outside the subset: combine with AND")
        if self.accept("ORDER"):
            self.expect("BY", reason="expected BY after ORDER")
            select.order.append(self.order_key())
            while self.accept(","):
                select.order.append(self.order_key())
        if self.accept("LIMIT"):
            select.limit = self.count("LIMIT")
            if self.accept("OFFSET"):
                select.offset = self.count("OFFSET")

    def count(self, what: str) -> int:
        """A non-negative integer literal (LIMIT, OFFSET)."""
        token = self.advance()
        if token.kind != "number" or not token.text.isdigit():
            raise syntax_error(token, reason=f"{what} takes a whole number")
        return int(token.text)

    def error_table(self) -> list[Token]:
        """ERROR_TABLE ( name ): the name's parts."""
        self.expect("ERROR_TABLE", reason="expected ERROR_TABLE(<table>)")
        self.expect("(", reason="expected ( after ERROR_TABLE")
        parts = self.qualified_name()
        self.expect(")", reason="expected ) after the table name")
        return parts

    def qualified_name(self) -> list[Token]:
        """`name`, `schema.name` or `db.schema.name`."""
        parts = [self.name_part()]
        while self.accept("."):
            parts.append(self.name_part())
        if len(parts) > 3:
            raise syntax_error(self.tokens[self.pos - 1], reason="a name has at most 3 parts")
        return parts

    def name_part(self) -> Token:
        """One identifier (quoted or not)."""
        if self.tok.kind not in ("ident", "qident"):
            raise syntax_error(self.tok, reason="expected an identifier")
        return self.advance()

    def truncate(self) -> Truncate:
        """TRUNCATE [TABLE] [IF EXISTS] ERROR_TABLE(name)."""
        self.expect("TRUNCATE", reason="expected TRUNCATE")
        self.accept("TABLE")
        if_exists = False
        if self.accept("IF"):
            self.expect("EXISTS", reason="expected EXISTS after IF")
            if_exists = True
        if not self.at("ERROR_TABLE"):
            raise unsupported(
                "TRUNCATE of a table",
                reason="only TRUNCATE TABLE ERROR_TABLE(<table>) is in the subset",
            )
        return Truncate(self.error_table(), if_exists)

    def describe(self) -> DescribePipe:
        """DESC[RIBE] PIPE name."""
        self.advance()
        if not self.at("PIPE"):
            raise unsupported(
                "DESCRIBE " + (self.tok.text.upper() or ""),
                reason="only DESCRIBE PIPE <pipe> is in the subset",
            )
        self.advance()
        return DescribePipe(self.qualified_name())

    # -- expressions --

    def item(self) -> Expr:
        """expr [[AS] alias]."""
        expr = self.expr()
        alias: Token | None = None
        if self.accept("AS"):
            alias = self.name_part()
        elif self.tok.kind in ("ident", "qident") and not self.at("FROM"):
            alias = self.advance()
        if alias is not None:
            expr.name = identifier(alias)
        return expr

    def expr(self) -> Expr:
        """primary (`::TYPE`)*."""
        start = self.pos
        node = self.primary()
        while self.accept("::"):
            node = Cast(node, self.cast_type(), "")
        node.name = self.text(start, self.pos)
        return node

    def text(self, start: int, end: int) -> str:
        """Snowflake's column name for tokens [start, end): unquoted parts upper-cased."""
        out = []
        for t in self.tokens[start:end]:
            out.append(t.text.upper() if t.kind == "ident" else t.text)
        return "".join(out)

    def cast_type(self) -> str:
        """The type after `::` (NUMBER(p, s) allowed)."""
        token = self.advance()
        word = token.word()
        if word not in _CASTS:
            if token.kind == "ident":
                raise unsupported(
                    f"cast to {word}",
                    reason=f"casts go to {', '.join(sorted(_CASTS))}",
                )
            raise syntax_error(token, reason="expected a type after ::")
        if self.accept("("):
            while not self.accept(")"):
                if self.advance().kind == "eof":
                    raise syntax_error(self.tok, reason="unclosed ( in the type")
        return _CASTS[word]

    def primary(self) -> Expr:
        """A column or path, a function, a literal or a binding."""
        token = self.tok
        word = token.word()
        if token.kind == "op" and token.text == "?":
            self.advance()
            key = str(token.index)
            if key not in self.bindings:
                raise SqlError(
                    422, "002049", "42601",
                    f"SQL compilation error: error line {token.line} at position {token.column}\n"
                    "Bind variable ? not set.",
                    reason=f'no binding "{key}" in the request\'s bindings',
                )
            return Literal(self.bindings[key], "?")
        constant = self.constant()
        if constant is not None:
            return constant
        if word in ("COUNT", "TO_JSON") and self.tokens[self.pos + 1].text == "(":
            self.advance()
            self.advance()
            if word == "COUNT":
                self.expect("*", reason="only COUNT(*) is in the subset")
                self.expect(")", reason="expected ) after COUNT(*")
                return CountStar()
            inner = self.expr()
            self.expect(")", reason="expected ) after the argument of TO_JSON")
            return ToJson(inner, "")
        if token.kind in ("ident", "qident"):
            if self.tokens[self.pos + 1].text == "(":
                raise unsupported(
                    word or identifier(token),
                    reason="functions other than TO_JSON and COUNT(*) are outside the subset",
                )
            return self.column_or_path()
        raise syntax_error(token, reason="expected a column, a literal or ?")

    def constant(self) -> Literal | None:
        """A string, number, TRUE, FALSE or NULL literal, if the current token is one."""
        token = self.tok
        word = token.word()
        if token.kind == "string":
            value = Value(TEXT, _string(token.text))
        elif token.kind == "number":
            value = Value(FIXED, Decimal(token.text))
        elif word in ("TRUE", "FALSE"):
            value = Value(BOOLEAN, word == "TRUE")
        elif word == "NULL":
            value = NULL_TEXT
        else:
            return None
        self.advance()
        return Literal(value, token.text)

    def column_or_path(self) -> Expr:
        """A column of the error table, optionally followed by a path into it."""
        token = self.advance()
        column = identifier(token)
        if column not in COLUMN_TYPES:
            raise SqlError(
                422, "000904", "42000",
                f"SQL compilation error: error line {token.line} at position {token.column}\n"
                f"invalid identifier '{column}'",
                reason=f"the error table's columns are {', '.join(COLUMNS)}",
            )
        keys: list[str | int] = []
        while self.at(":", ".", "["):
            op = self.advance()
            if op.text == "[":
                index = self.advance()
                if index.kind == "string":
                    keys.append(_string(index.text))
                elif index.kind == "number" and index.text.isdigit():
                    keys.append(int(index.text))
                else:
                    raise syntax_error(index, reason="expected 'key' or a number inside [ ]")
                self.expect("]", reason="expected ]")
                continue
            key = self.advance()
            if key.kind == "ident":
                keys.append(key.text)  # path keys keep their case, quoted or not
            elif key.kind == "qident":
                keys.append(identifier(key))
            else:
                raise syntax_error(key, reason=f"expected a key after {op.text}")
        if not keys:
            return Column(column, column)
        if COLUMN_TYPES[column] != OBJECT:
            raise SqlError(
                422, "001044", "42P13",
                f"SQL compilation error: error line {token.line} at position {token.column}\n"
                f"Invalid argument types for function 'GET_PATH': ({COLUMN_TYPES[column].upper()}"
                ", VARCHAR)",
                reason="paths (:key) apply to ERROR_METADATA and ERROR_DATA only",
            )
        return Path(column, keys, "")

    def predicate(self) -> Predicate:
        """expr op expr | expr IS [NOT] NULL | expr [NOT] IN (expr, ...)."""
        left = self.expr()
        _reject_count(left)
        if self.accept("IS"):
            negate = bool(self.accept("NOT"))
            self.expect("NULL", reason="expected NULL after IS [NOT]")
            return Predicate(
                lambda row: _is_null(left.eval(row)) != negate
            )
        negate = bool(self.accept("NOT"))
        if self.accept("IN"):
            self.expect("(", reason="expected ( after IN")
            options = [self.expr()]
            while self.accept(","):
                options.append(self.expr())
            self.expect(")", reason="expected ) after the IN list")

            def test_in(row: Row) -> bool:
                value = left.eval(row)
                if _is_null(value):
                    return False
                hit = any(compare("=", value, o.eval(row)) for o in options)
                return hit != negate

            return Predicate(test_in)
        if negate:
            raise syntax_error(self.tok, reason="expected IN after NOT")
        op = self.advance()
        if op.text not in _COMPARE:
            raise syntax_error(op, reason="expected = != <> < <= > >= IS or IN")
        right = self.expr()
        _reject_count(right)
        return Predicate(lambda row: compare(op.text, left.eval(row), right.eval(row)))

    def order_key(self) -> OrderKey:
        """expr | ordinal, [ASC|DESC] [NULLS FIRST|LAST]."""
        token = self.tok
        if token.kind == "number" and token.text.isdigit():
            self.advance()
            key = OrderKey(None, ordinal=int(token.text))
        else:
            expr = self.expr()
            _reject_count(expr)
            key = OrderKey(expr)
        if self.accept("DESC"):
            key.descending = True
        else:
            self.accept("ASC")
        if self.accept("NULLS"):
            which = self.advance()
            if which.word() not in ("FIRST", "LAST"):
                raise syntax_error(which, reason="expected FIRST or LAST after NULLS")
            key.nulls_first = which.word() == "FIRST"
        return key


def _reject_count(expr: Expr) -> None:
    if isinstance(expr, CountStar):
        raise unsupported("COUNT(*) in a condition", reason="COUNT(*) goes in the select list")


def _is_null(v: Value) -> bool:
    return v.value is None or v.value is JSON_NULL


def _string(text: str) -> str:
    """The value of a '...' literal ('' and backslash escapes)."""
    body = text[1:-1].replace("''", "'")
    return re.sub(
        r"\\(.)",
        lambda m: {"n": "\n", "t": "\t", "r": "\r", "0": "\0"}.get(m[1], m[1]),
        body,
    )


def parse(text: str, bindings: dict[str, object] | None = None) -> Statement:
    """The statement in `text` with its `?` bindings (SqlError when outside the subset)."""
    values = {str(k): binding_value(str(k), v) for k, v in (bindings or {}).items()}
    return Parser(text, values).statement()


# -- results ------------------------------------------------------------------------------------


@dataclass
class ResultColumn:
    """One column of a result: its name and SQL type."""

    name: str
    type: str


@dataclass
class Result:
    """A statement's result: columns, rows of strings (None for NULL), optional DML stats."""

    columns: list[ResultColumn]
    rows: list[list[str | None]]
    stats: dict[str, int] | None = None


def select_rows(select: Select, rows: Iterable[ErrorRow]) -> Result:
    """Run a parsed SELECT over the rows of an error table."""
    typed = [error_table_row(r) for r in rows]
    matching = [row for row in typed if all(p(row) for p in select.where)]
    items: Sequence[Expr] = (
        [Column(c, c) for c in COLUMNS] if select.star else select.items
    )
    if len(items) == 1 and isinstance(items[0], CountStar):
        count = len(matching)
        if select.offset or (select.limit is not None and select.limit == 0):
            count_rows: list[list[str | None]] = []
        else:
            count_rows = [[str(count)]]
        return Result([ResultColumn(items[0].name, FIXED)], count_rows)
    values = [[item.eval(row) for item in items] for row in matching]
    if select.order:
        values = _ordered(values, matching, select.order)
    end = None if select.limit is None else select.offset + select.limit
    values = values[select.offset : end]
    return Result(
        [ResultColumn(item.name, item.type) for item in items],
        [[render(v) for v in out] for out in values],
    )


def _ordered(
    values: list[list[Value]], rows: list[Row], order: list[OrderKey]
) -> list[list[Value]]:
    def sort_key(pair: tuple[list[Value], Row]) -> tuple[Any, ...]:
        out, row = pair
        keys: list[Any] = []
        for key in order:
            if key.expr is None:
                if not 1 <= key.ordinal <= len(out):
                    raise SqlError(
                        422, "002025", "42601",
                        f"SQL compilation error:\nORDER BY position {key.ordinal} is not in "
                        "select list",
                    )
                value = out[key.ordinal - 1]
            else:
                value = key.expr.eval(row)
            keys.append(_SortKey(_comparable(value), key.descending, key.nulls_first))
        return tuple(keys)

    pairs = sorted(zip(values, rows, strict=True), key=sort_key)
    return [out for out, _ in pairs]


class _SortKey:
    """Orders one ORDER BY value: NULLS LAST ascending and NULLS FIRST descending by default."""

    __slots__ = ("descending", "nulls_first", "value")

    def __init__(self, value: Any, descending: bool, nulls_first: bool | None) -> None:
        self.value = value
        self.descending = descending
        self.nulls_first = descending if nulls_first is None else nulls_first

    def _rank(self) -> tuple[int, str]:
        v = self.value
        return (0, "") if v is None else (1, type(v).__name__)

    def __eq__(self, other: object) -> bool:
        # Tuples of keys compare element by element, `==` first: equal values go to the next key.
        if not isinstance(other, _SortKey):
            return NotImplemented
        a, b = self.value, other.value
        if a is None or b is None:
            return a is None and b is None
        return self._rank() == other._rank() and bool(a == b)

    __hash__ = None  # type: ignore[assignment]

    def __lt__(self, other: _SortKey) -> bool:
        a, b = self.value, other.value
        if a is None or b is None:
            if a is None and b is None:
                return False
            return (a is None) == self.nulls_first
        if type(a) is not type(b) and not (isinstance(a, Decimal) and isinstance(b, Decimal)):
            return (self._rank() < other._rank()) != self.descending
        return bool(a > b) if self.descending else bool(a < b)
