"""Redis URLs of the state store: the Sentinel form, and every form shown without its password.

`SNOWPIPE_STATE_URL` is a Redis URL (`redis://`, `rediss://`) or Celery's Sentinel form:

    sentinel://[[USER]:PASSWORD@]HOST[:PORT][;sentinel://HOST[:PORT]...][/DB]

one `sentinel://` part per Sentinel, separated by `;`. The port defaults to Sentinel's 26379.
The user and password (in any one part, or `?password=`) are the Redis nodes' (`AUTH` on the
primary), as in Celery; Sentinel's own password is a setting of its own. The database may end
any part (`/DB`, default 0); parts that name one must name the same.

Standard library only (the settings import it). Errors are `ValueError`s whose text never holds
a password: it names the setting, the part (masked) and the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

SENTINEL_SCHEME = "sentinel"
DEFAULT_SENTINEL_PORT = 26379
PART_SEPARATOR = ";"
SETTING = "SNOWPIPE_STATE_URL"
FORM = "sentinel://HOST:26379[;sentinel://HOST2:26379...]/DB"
_QUERY_PASSWORD = re.compile(r"(?i)([?&]password=)[^&;#]*")


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed `sentinel://` URL: the Sentinels' addresses, the database, the nodes' login."""

    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def is_sentinel_url(url: str) -> bool:
    """True for Celery's Sentinel form (`sentinel://...`)."""
    return url.strip().lower().startswith(SENTINEL_SCHEME + "://")


def _redact_part(part: str) -> str:
    masked = _QUERY_PASSWORD.sub(r"\1***", part)
    try:
        parts = urlsplit(masked)
        password = parts.password
    except ValueError:  # an unparsable port: mask everything between "//" and "@"
        return re.sub(r"//[^/@]*@", "//***@", masked)
    if password is None:
        return masked
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def redact_url(url: str) -> str:
    """`url` with every password (`user:***@`, `?password=***`) masked, in each `;` part."""
    return PART_SEPARATOR.join(_redact_part(part) for part in url.split(PART_SEPARATOR))


def _fail(problem: str, fix: str = f"write it as {FORM}") -> ValueError:
    return ValueError(f"{SETTING} {problem}; {fix}")


@dataclass(frozen=True)
class _Part:
    address: tuple[str, int]
    db: int | None
    username: str | None
    password: str | None = field(repr=False)


def _parse_part(raw: str, n: int) -> _Part:
    part = raw.strip()
    shown = _redact_part(part)
    if not part:
        raise _fail(f"has an empty part (number {n})", "remove the extra ';'")
    if not is_sentinel_url(part):
        raise _fail(f"part {shown!r} is not a sentinel:// address")
    try:
        parts = urlsplit(part)
        port = parts.port or DEFAULT_SENTINEL_PORT
    except ValueError:
        raise _fail(f"part {shown!r} has an invalid port") from None
    if not parts.hostname:
        raise _fail(f"part {shown!r} names no host")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise _fail(f"part {shown!r} names database {path!r}, not a number")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(query) - {"password"})
    if unknown:
        raise _fail(
            f"part {shown!r} has options {', '.join(unknown)}",
            "remove them: only password= is read (the timeouts are the worker's own)",
        )
    return _Part(
        address=(parts.hostname, port),
        db=int(path) if path else None,
        username=unquote(parts.username) if parts.username else None,
        password=(unquote(parts.password) if parts.password else None)
        or query.get("password")
        or None,
    )


def parse_sentinel_url(url: str) -> SentinelUrl:
    """The Sentinels, database and login of a `sentinel://` URL, or a ValueError naming the
    problem (without the password) and the form."""
    parts = [_parse_part(raw, n) for n, raw in enumerate(url.strip().split(PART_SEPARATOR), 1)]
    dbs = {p.db for p in parts if p.db is not None}
    users = {p.username for p in parts if p.username is not None}
    passwords = {p.password for p in parts if p.password is not None}
    if len(dbs) > 1:
        raise _fail(
            f"names different databases ({', '.join(map(str, sorted(dbs)))})",
            "name one database, at the end: .../DB",
        )
    if len(users) > 1 or len(passwords) > 1:
        raise _fail(
            "names different users or passwords in its parts",
            "give the Redis login once, in the first part",
        )
    return SentinelUrl(
        sentinels=tuple(p.address for p in parts),
        db=dbs.pop() if dbs else 0,
        username=users.pop() if users else None,
        password=passwords.pop() if passwords else None,
    )


def url_password(url: str) -> str | None:
    """The password a `redis://`/`rediss://` URL carries (userinfo or `?password=`), if any."""
    try:
        parts = urlsplit(url)
        if parts.password:
            return unquote(parts.password)
    except ValueError:
        return None
    return dict(parse_qsl(parts.query)).get("password") or None
