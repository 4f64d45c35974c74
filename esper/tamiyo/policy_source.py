"""Where a learned policy comes from: a directory, or Urza by name and version.

A policy reference (``controller.policy_path``, ``esper-train --tamiyo-policy``, ``esper-tamiyo
--policy``) is either a policy directory (`esper.tamiyo.policy_store`) or

    urza://HOST:PORT/NAME           the newest version of NAME in that Urza
    urza://HOST:PORT/NAME@VERSION   that version (an integer >= 1)

`publish_to_urza` stores a policy directory in Urza as the next version of a name (what
``esper-tamiyo-train --publish-urza`` does). `load_policy_ref` loads either kind, with the same
checks as a directory: the weights' SHA-256 (against Urza's record and the manifest), the
feature schema and layout (a policy of another schema is refused naming both). An unknown name
or version is a PolicyLoadError naming the versions Urza has. `current_version` is what the Tamiyo
server polls for a hot swap: a pinned Urza version never changes, an unpinned one follows the
newest.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from esper.tamiyo.policy_store import (
    MANIFEST,
    LoadedPolicy,
    PolicyLoadError,
    check_layout,
    load_policy,
    manifest_version,
    model_from_bytes,
)

SCHEME = "urza://"
_REF = re.compile(r"^urza://(?P<address>[^/\s]+)/(?P<name>[^@/\s]+)(?:@(?P<version>[^@/\s]*))?$")


@dataclass(frozen=True)
class UrzaPolicyRef:
    address: str
    name: str
    version: int = 0  # 0: the newest

    def __str__(self) -> str:
        return f"{SCHEME}{self.address}/{self.name}" + (f"@{self.version}" if self.version else "")


def is_urza_ref(text: str) -> bool:
    return str(text).startswith(SCHEME)


def parse_urza_ref(text: str) -> UrzaPolicyRef:
    """The reference in `text`; PolicyLoadError saying the expected form otherwise."""
    m = _REF.match(text)
    version = m.group("version") if m else None
    if m is None or (version is not None and not (version.isdigit() and int(version) >= 1)):
        raise PolicyLoadError(f"policy reference {text!r} is malformed; expected urza://HOST:PORT/NAME or "
                              "urza://HOST:PORT/NAME@VERSION with VERSION an integer >= 1")
    return UrzaPolicyRef(m.group("address"), m.group("name"), int(version) if version else 0)


def _client(address: str):
    from esper.clients.urza import UrzaClient

    return UrzaClient(address)


def load_from_urza(ref: UrzaPolicyRef) -> LoadedPolicy:
    """The policy `ref` names (see the module docstring for what is checked)."""
    from esper.errors import EsperError, NotFoundError

    try:
        with _client(ref.address) as urza:
            record, weights = urza.get_policy(ref.name, ref.version)
    except NotFoundError as exc:
        raise PolicyLoadError(f"{ref}: {exc.message}") from exc
    except EsperError as exc:
        raise PolicyLoadError(f"{ref}: Urza could not serve the policy ({type(exc).__name__}: {exc.message})") from exc
    where = f"{SCHEME}{ref.address}/{record.name}@{record.version}"
    try:
        manifest = json.loads(record.manifest_json)
    except ValueError:
        raise PolicyLoadError(f"{where}: the stored manifest is not JSON") from None
    check_layout(manifest, where)
    # Urza verified the weights against its record; the manifest's own checksum is checked here too.
    return LoadedPolicy(model_from_bytes(manifest, weights, where), manifest, where)


def load_policy_ref(text: str) -> LoadedPolicy:
    """A policy from a directory or an Urza reference."""
    if is_urza_ref(text):
        return load_from_urza(parse_urza_ref(text))
    return load_policy(text)


def current_version(text: str) -> str | None:
    """The manifest version a reference resolves to now, None when it cannot be read."""
    if not is_urza_ref(text):
        return manifest_version(text)
    from esper.errors import EsperError

    ref = parse_urza_ref(text)
    try:
        with _client(ref.address) as urza:
            record, _ = urza.get_policy(ref.name, ref.version, metadata_only=True)
    except EsperError:
        return None
    return record.policy_version


def publish_to_urza(directory: Path | str, address: str, name: str = "gnn"):
    """Stores the policy in `directory` in the Urza at `address` as the next version of `name`
    (the policy is loaded first, so a broken one is never published); (PolicyRecord, created)."""
    directory = Path(directory)
    loaded = load_policy(directory)
    manifest_text = (directory / MANIFEST).read_text()
    weights = (directory / loaded.manifest["weights_file"]).read_bytes()
    with _client(address) as urza:
        return urza.publish_policy(name, manifest_text, weights)


__all__ = ["SCHEME", "UrzaPolicyRef", "current_version", "is_urza_ref", "load_from_urza", "load_policy_ref",
           "parse_urza_ref", "publish_to_urza"]
