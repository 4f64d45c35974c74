"""Who is calling: principals named by bearer tokens, each with roles.

A server configured with tokens (`ServerConfig.principals`, or the single `auth_token`) maps the
``authorization: Bearer <token>`` header of each call to a `Principal`; handlers read it with
`current_principal()` (a context variable set for the duration of the call). Roles are plain
names; the one Esper checks today is ``compiler``: only it may create VALIDATED artifacts in Urza.

A server without any token trusts its network (it binds to loopback by default): every caller is
the anonymous principal, which holds every role.

Principals file (``--principals-file``), JSON::

    {"principals": [
      {"name": "tezzeret", "token": "...", "roles": ["compiler"]},
      {"name": "trainer", "token_file": "/run/secrets/trainer", "roles": []}
    ]}
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROLE_COMPILER = "compiler"
ALL_ROLES = frozenset({ROLE_COMPILER})


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a name for logs and errors, and its roles."""

    name: str
    roles: frozenset[str] = field(default_factory=frozenset)

    def has_role(self, role: str) -> bool:
        return role in self.roles


ANONYMOUS = Principal("anonymous", ALL_ROLES)
# The single deployment token (--auth-token-file / ESPER_AUTH_TOKEN) keeps its old meaning: full access.
DEPLOYMENT = Principal("deployment", ALL_ROLES)

_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("esper_principal", default=ANONYMOUS)


def current_principal() -> Principal:
    """The caller of the RPC being handled (ANONYMOUS on a server without tokens)."""
    return _current.get()


def set_current_principal(principal: Principal) -> contextvars.Token:
    """Bind `principal` to the running call; the interceptor does this before each handler."""
    return _current.set(principal)


def load_principals(path: Path) -> dict[str, Principal]:
    """token -> Principal from a principals file (format in the module docstring).

    ValueError naming the entry and key when the file is malformed.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"principals file {path}: cannot read it as JSON: {exc}") from exc
    entries = document.get("principals") if isinstance(document, Mapping) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"principals file {path}: expected {{\"principals\": [ ... ]}} with at least one entry")
    out: dict[str, Principal] = {}
    for i, entry in enumerate(entries):
        where = f"principals file {path}: principals[{i}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be an object with name, token or token_file, and roles")
        unknown = set(entry) - {"name", "token", "token_file", "roles"}
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {sorted(unknown)}")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.name must be a non-empty string")
        if ("token" in entry) == ("token_file" in entry):
            raise ValueError(f"{where} needs exactly one of token and token_file")
        token = entry["token"] if "token" in entry else Path(entry["token_file"]).read_text()
        token = token.strip() if isinstance(token, str) else ""
        if not token:
            raise ValueError(f"{where}: the token is empty")
        roles = entry.get("roles", [])
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise ValueError(f"{where}.roles must be a list of role names, e.g. [\"{ROLE_COMPILER}\"]")
        unknown_roles = set(roles) - ALL_ROLES
        if unknown_roles:
            raise ValueError(f"{where}.roles has unknown role(s) {sorted(unknown_roles)}; known: {sorted(ALL_ROLES)}")
        if token in out:
            raise ValueError(f"{where}: the same token is already given to {out[token].name!r}")
        out[token] = Principal(name, frozenset(roles))
    return out
