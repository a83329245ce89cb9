"""Error bodies of every observed shape become the right typed error, without secrets."""

from __future__ import annotations

import ast
import inspect
import pickle
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

import worker
import worker.errors
from worker.snowpipe import errors as e


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (
            b'{"code": "STALE_CONTINUATION_TOKEN_SEQUENCER", "message": "Channel sequencer in the '
            b'continuation token is stale. Please reopen the channel"}',
            "STALE_CONTINUATION_TOKEN_SEQUENCER",
            "Channel sequencer in the continuation token is stale. Please reopen the channel",
        ),
        (
            b'{"error_code": "ERR_PIPE_DOES_NOT_EXIST_OR_NOT_AUTHORIZED", "message": "no pipe"}',
            "ERR_PIPE_DOES_NOT_EXIST_OR_NOT_AUTHORIZED",
            "no pipe",
        ),
        (b'"ERR_GENERAL_EXCEPTION_RETRY_REQUEST"', "ERR_GENERAL_EXCEPTION_RETRY_REQUEST", None),
        (b'{"code": 390701, "message": "Request rate exceeds max. Try later."}', "390701", None),
        (b'{"code": "390144", "message": "JWT token is invalid. [x]"}', "390144", None),
        (
            b'{"code": "ERR_X", "message": "m", "status_code": 12, "result_handler": null}',
            "ERR_X",
            "m",
        ),
        (b"<html><body>502 Bad Gateway</body></html>", None, "502 Bad Gateway"),
        (b"", None, "(empty response body)"),
        (b'{"message": "only a message"}', None, "only a message"),
        (b'{"code": "ERR_ONLY_CODE"}', "ERR_ONLY_CODE", "ERR_ONLY_CODE"),
        (b"12345", "12345", None),
        (b"[1, 2]", None, "[1, 2]"),
    ],
)
def test_every_body_shape_yields_code_and_message(
    body: bytes, code: str | None, message: str | None
) -> None:
    got_code, got_message = e.parse_error_body(body)
    assert got_code == code
    if message is not None:
        assert message in got_message


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (400, '{"code":"STALE_CONTINUATION_TOKEN_SEQUENCER"}', e.StaleContinuationTokenError),
        (409, '{"code":"ERR_CHANNEL_MUST_BE_REOPENED","message":"m"}', e.ChannelInvalidatedError),
        (400, '{"code":"ERR_CHANNEL_HAS_INVALID_ROW_SEQUENCER"}', e.ChannelInvalidatedError),
        (
            400,
            '{"code":"ERR_CHANNEL_MUST_BE_REOPENED_DUE_TO_ROW_SEQ_GAP"}',
            e.ChannelInvalidatedError,
        ),
        (
            404,
            '{"code":"ERR_CHANNEL_DOES_NOT_EXIST_OR_IS_NOT_AUTHORIZED"}',
            e.ChannelNotFoundError,
        ),
        (
            404,
            '{"code":"ERR_CHANNEL_DOES_NOT_EXIST_OR_NOT_AUTHORIZED"}',
            e.ChannelNotFoundError,
        ),
        (
            400,
            '{"code":"ERR_CHANNEL_DOES_NOT_EXIST_OR_IS_NOT_AUTHORIZED","message":""}',
            e.ChannelNotFoundError,
        ),
        (410, '{"code":"ERR_PIPE_FAILED_OVER","message":"m"}', e.PipeFailoverError),
        (410, "", e.PipeFailoverError),
        (404, '{"error_code":"ERR_PIPE_DOES_NOT_EXIST_OR_NOT_AUTHORIZED"}', e.PipeNotFoundError),
        (404, "not found", e.PipeNotFoundError),
        (503, '"ERR_GENERAL_EXCEPTION_RETRY_REQUEST"', e.RetryRequestError),
        (500, '{"code":"ERR_GENERAL_EXCEPTION_RETRY_REQUEST"}', e.RetryRequestError),
        (409, '{"code":"ERR_OPEN_CHANNEL_IN_PROGRESS"}', e.OpenChannelInProgressError),
        (409, '{"code":"ERR_CHANNEL_HAS_UNCOMMITTED_DATA"}', e.UncommittedDataError),
        (409, '{"code":"SOMETHING_ELSE"}', e.RequestRejectedError),
        (429, '{"code":"390701","message":"Request rate exceeds max."}', e.RateLimitedError),
        (503, '{"code":"ReceiverSaturated"}', e.RateLimitedError),
        (401, '{"code":"390144","message":"JWT token is invalid."}', e.InvalidJWTError),
        (401, "", e.AuthError),
        (403, "", e.ForbiddenError),
        (408, "", e.RequestTimeoutError),
        (413, "", e.PayloadTooLargeError),
        (400, '{"code":"391902","message":"Unsupported Accept header null"}', e.BadRequestError),
        (418, "", e.RequestRejectedError),
        (500, "boom", e.ServerError),
        (502, "<html>bad gateway</html>", e.ServerError),
        (599, "", e.ServerError),
    ],
)
def test_error_class_is_chosen_by_code_then_status(
    status: int, body: str, cls: type[e.SnowpipeError]
) -> None:
    err = e.error_from_response(status, body, request_id="rid-1", op="append_rows")
    assert type(err) is cls
    assert err.status == status
    assert err.request_id == "rid-1"
    assert "rid-1" in str(err)
    assert "append_rows" in str(err)


@pytest.mark.parametrize(
    ("cls", "branch"),
    [
        (e.TransportError, e.RetryableError),
        (e.RequestTimeoutError, e.RetryableError),
        (e.RateLimitedError, e.RetryableError),
        (e.ServerError, e.RetryableError),
        (e.RetryRequestError, e.RetryableError),
        (e.OpenChannelInProgressError, e.RetryableError),
        (e.StaleContinuationTokenError, e.ChannelReopenRequired),
        (e.ChannelInvalidatedError, e.ChannelReopenRequired),
        (e.ChannelNotFoundError, e.ChannelReopenRequired),
        (e.InvalidJWTError, e.AuthError),
        (e.ForbiddenError, e.AuthError),
        (e.BadRequestError, e.PermanentError),
        (e.PipeNotFoundError, e.PermanentError),
        (e.PayloadTooLargeError, e.PermanentError),
        (e.UncommittedDataError, e.PermanentError),
        (e.RequestRejectedError, e.PermanentError),
        (e.ProtocolError, e.PermanentError),
        (e.RowTooLargeError, e.PermanentError),
    ],
)
def test_each_leaf_sits_under_the_branch_the_worker_relies_on(
    cls: type[e.SnowpipeError], branch: type[e.SnowpipeError]
) -> None:
    assert issubclass(cls, branch)
    assert issubclass(cls, e.SnowpipeError)
    # Each leaf is in the tree drawn in the docstring of worker/errors.py.
    assert cls.__name__ in (worker.errors.__doc__ or "")


def _exception_classes() -> dict[str, list[str]]:
    """Every exception class defined in worker/ (by its source), with the names of its bases."""
    import builtins

    known = {n for n in dir(builtins) if n.endswith(("Error", "Exception"))} | {"RedisError"}
    classes: dict[str, list[str]] = {}
    root = Path(worker.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = [b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "")
                         for b in node.bases]
                classes[node.name] = bases
    found: dict[str, list[str]] = {}
    changed = True
    while changed:
        changed = False
        for name, bases in classes.items():
            if name not in found and any(b in known or b in found for b in bases):
                found[name] = bases
                changed = True
    return found


def test_every_error_of_the_product_is_in_the_one_tree() -> None:
    # One root, and every class drawn in the tree: `except SnowpipeWorkerError` catches them all.
    doc = worker.errors.__doc__ or ""
    found = _exception_classes()
    assert len(found) > 40
    tree = {name for name, _ in inspect.getmembers(worker.errors, inspect.isclass)}
    for name, bases in found.items():
        if name.startswith("_"):
            continue  # control flow inside one function (the CLI's _Stop)
        assert name == "SnowpipeWorkerError" or any(b in tree or b in found for b in bases)
        assert "SnowpipeWorkerError" in _ancestry(name, found), name
        assert name in doc, f"{name} is not drawn in the tree of worker/errors.py"


def _ancestry(name: str, found: dict[str, list[str]]) -> set[str]:
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(found.get(current, []))
    return seen


def test_errors_keep_their_builtin_bases_for_existing_handlers() -> None:
    from worker.connectivity import BrokerUnavailableError
    from worker.errors import InvalidBatchError, SettingsError

    assert issubclass(BrokerUnavailableError, ConnectionError)
    assert issubclass(InvalidBatchError, ValueError)
    assert issubclass(SettingsError, ValueError)
    # worker.tasks needs a configuration to import: read its bases from the source.
    assert "RedisError" in _exception_classes()["StateNotReplicatedError"]
    # A row that cannot be encoded is both the batch's fault and a permanent Snowpipe error.
    assert issubclass(e.EncodingError, InvalidBatchError)
    assert issubclass(e.EncodingError, e.PermanentError)


def test_token_cause_unwraps_nested_token_errors_to_the_refresh_error() -> None:
    from worker.errors import TokenUnavailableError, token_cause

    root = e.InvalidJWTError("bad key")
    inner = TokenUnavailableError("jwt", name="jwt", cause=root)
    outer = TokenUnavailableError("scoped", name="scoped", cause=inner)
    assert token_cause(outer) is root
    assert token_cause(TokenUnavailableError("x", name="x")).args == ("x",)
    plain = KeyError("k")
    assert token_cause(plain) is plain


def test_every_error_says_what_to_do() -> None:
    for status in (400, 401, 403, 404, 408, 409, 413, 429, 500, 503):
        err = e.error_from_response(status, "")
        assert " -> " in str(err), str(err)
        assert err.hint


def test_retry_after_seconds_is_parsed_from_headers() -> None:
    err = e.error_from_response(429, "{}", headers={"Retry-After": "7"})
    assert isinstance(err, e.RateLimitedError)
    assert err.retry_after == 7.0


def test_retry_after_http_date_is_parsed_relative_to_now() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    header = format_datetime(now + timedelta(seconds=30), usegmt=True)
    err = e.error_from_response(503, "x", headers={"retry-after": header}, now=now.timestamp())
    assert isinstance(err, e.ServerError)
    assert err.retry_after == pytest.approx(30.0)


@pytest.mark.parametrize("value", [None, "", "soon", "nan", "inf"])
def test_unusable_retry_after_is_ignored(value: str | None) -> None:
    assert e.parse_retry_after(value) is None


def test_retry_after_in_the_past_means_no_wait() -> None:
    assert e.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert e.parse_retry_after("-3") == 0.0


JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJBQ01FLkJPQiJ9.c2lnbmF0dXJlLWJ5dGVz"


def test_tokens_in_server_messages_are_scrubbed_from_str_and_repr() -> None:
    body = f'{{"code":"390144","message":"JWT token is invalid: {JWT} / Bearer abc.def"}}'
    err = e.error_from_response(401, body)
    for text in (str(err), repr(err), err.message):
        assert JWT not in text
        assert "abc.def" not in text
    assert "[redacted-token]" in str(err)


def test_long_non_json_bodies_are_shortened() -> None:
    code, message = e.parse_error_body(b"x" * 10_000)
    assert code is None
    assert len(message) <= e.MAX_MESSAGE_CHARS + 3


def test_errors_survive_pickling_for_celery() -> None:
    err = e.error_from_response(429, '{"code":"390701"}', headers={"retry-after": "2"}, op="o")
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is e.RateLimitedError
    assert (again.status, again.code, again.retry_after, again.op) == (429, "390701", 2.0, "o")
    assert str(again) == str(err)


def test_row_too_large_names_the_row() -> None:
    err = e.RowTooLargeError("too big", row_index=17, row_bytes=5_000_000, limit=4_194_304)
    assert "row 17" in str(err)
    assert err.row_index == 17
