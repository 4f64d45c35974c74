"""`open_backend(url)`: the Oona backend a URL names (``memory://`` or ``redis://``).

Kept apart from `esper.oona.backend` (the interface) so that the backends import the interface
and this module imports the backends, never the reverse.
"""

from __future__ import annotations

import urllib.parse

from esper.errors import InvalidArgumentError
from esper.oona.backend import DEFAULT_RETENTION, OonaBackend
from esper.oona.memory import InMemoryBackend


def open_backend(url: str | None, *, retention: int = DEFAULT_RETENTION) -> OonaBackend:
    """Backend for a URL: ``memory://`` (default, also for None/empty) or ``redis://host:port/db``.

    Query parameters: ``retention=N`` (messages kept per topic) on both; ``namespace=NAME``
    (key prefix, default ``esper:oona``) on Redis; ``retention_bytes=N`` on memory.
    """
    url = url or "memory://"
    parsed = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))
    if "retention" in query:
        retention = _positive_int(query.pop("retention"), "retention", url)
    if parsed.scheme == "memory":
        kwargs = {}
        if "retention_bytes" in query:
            kwargs["retention_bytes"] = _positive_int(query.pop("retention_bytes"), "retention_bytes", url)
        _reject_unknown(query, url)
        return InMemoryBackend(retention=retention, **kwargs)
    if parsed.scheme in ("redis", "rediss"):
        from esper.oona.redis_streams import DEFAULT_NAMESPACE, RedisStreamsBackend

        namespace = query.pop("namespace", DEFAULT_NAMESPACE)
        _reject_unknown(query, url)
        redis_url = urllib.parse.urlunsplit(parsed._replace(query=""))
        return RedisStreamsBackend(redis_url, retention=retention, namespace=namespace)
    raise InvalidArgumentError(f"Oona backend URL {url!r} has an unknown scheme {parsed.scheme!r}; expected "
                               "'memory://' or 'redis://host:port/db'", field="backend_url")


def _positive_int(text: str, name: str, url: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise InvalidArgumentError(f"{name}={text!r} in {url!r} must be a positive integer", field="backend_url")
    return value


def _reject_unknown(query: dict[str, str], url: str) -> None:
    if query:
        raise InvalidArgumentError(f"unknown option(s) {sorted(query)} in Oona backend URL {url!r}",
                                   field="backend_url")
