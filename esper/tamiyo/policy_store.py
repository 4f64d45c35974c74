"""A learned Tamiyo policy on disk: safetensors weights plus a JSON manifest, no pickle.

A policy directory holds ``manifest.json`` and the weights file it names
(``weights-<sha256 prefix>.safetensors``). The manifest records:

    format              "esper-tamiyo-policy/1"
    kind, version       "gnn", and a version string unique to these weights
    created_at          UTC ISO time
    architecture        `esper.tamiyo.gnn.Architecture` fields
    feature_schema      `esper.tamiyo.graph.FEATURE_SCHEMA` the policy was trained on
    node_features, global_features, actions, growth_modes   the exact layout it expects
    training_data_sha256  hash of the replay data it was trained on
    training, metrics   how it was trained and how it scored
    weights_file, weights_sha256

`save_policy` writes the weights under a new name first and replaces ``manifest.json``
atomically last, so a reader (the Tamiyo server hot-swapping) sees either the old policy or the
new one, never a mix. `load_policy` refuses a policy whose schema or layout differs from what
this code builds, or whose weights do not match their checksum, with a message saying which.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper.tamiyo.gnn import Architecture, TamiyoGNN
from esper.tamiyo.graph import (
    FEATURE_SCHEMA,
    GROWTH_MODES,
    action_names,
    global_feature_names,
    node_feature_names,
)

FORMAT = "esper-tamiyo-policy/1"
MANIFEST = "manifest.json"


class PolicyLoadError(ValueError):
    """A policy that cannot be loaded here; the message says what was wrong and what was expected."""


@dataclass
class LoadedPolicy:
    model: TamiyoGNN
    manifest: dict[str, Any]
    source: str

    @property
    def version(self) -> str:
        return str(self.manifest["version"])


def expected_layout() -> dict[str, Any]:
    """The feature schema and layout this code builds (what a loadable policy must match)."""
    return {"feature_schema": FEATURE_SCHEMA, "node_features": node_feature_names(),
            "global_features": global_feature_names(), "actions": action_names(),
            "growth_modes": list(GROWTH_MODES)}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def policy_bytes(model: TamiyoGNN) -> bytes:
    """The safetensors serialisation of the model's weights (contiguous CPU float32)."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return save(tensors, metadata={"format": FORMAT})


def save_policy(directory: Path | str, model: TamiyoGNN, *, training_data_sha256: str,
                training: dict[str, Any], metrics: dict[str, Any], version: str | None = None) -> dict[str, Any]:
    """Writes (or replaces) the policy in `directory`; returns the manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = policy_bytes(model)
    digest = _sha256(data)
    now = dt.datetime.now(dt.UTC)
    weights_name = f"weights-{digest[:16]}.safetensors"
    tmp = directory / f".{weights_name}.tmp"
    tmp.write_bytes(data)
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(directory / weights_name)
    manifest = {
        "format": FORMAT, "kind": "gnn",
        "version": version or f"gnn-{now.strftime('%Y%m%dT%H%M%S')}-{digest[:8]}",
        "created_at": now.isoformat(), "architecture": model.arch.to_dict(), **expected_layout(),
        "training_data_sha256": training_data_sha256, "training": training, "metrics": metrics,
        "weights_file": weights_name, "weights_sha256": digest,
    }
    from esper.durable import fsync_dir, write_json_atomic

    old = _read_manifest(directory) if (directory / MANIFEST).exists() else None
    write_json_atomic(directory / MANIFEST, manifest)
    fsync_dir(directory)
    # Keep the previous weights (a reader may have just read the old manifest); drop older ones.
    keep = {weights_name, (old or {}).get("weights_file")}
    for path in directory.glob("weights-*.safetensors"):
        if path.name not in keep:
            path.unlink(missing_ok=True)
    return manifest


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise PolicyLoadError(f"{directory}: no {MANIFEST}; expected a policy directory written by "
                              "esper-tamiyo-train") from None
    except (OSError, ValueError) as exc:
        raise PolicyLoadError(f"{path}: unreadable policy manifest ({exc}); expected JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise PolicyLoadError(f"{path}: format {found!r}; expected {FORMAT!r}")
    return manifest


def check_layout(manifest: dict[str, Any], where: str) -> None:
    """Raises PolicyLoadError when the manifest's features or actions differ from this code's."""
    want = expected_layout()
    if manifest.get("feature_schema") != want["feature_schema"]:
        raise PolicyLoadError(
            f"{where}: the policy was trained on feature schema {manifest.get('feature_schema')!r}; this Tamiyo "
            f"builds {want['feature_schema']!r}; expected a policy retrained with esper-tamiyo-train")
    for key in ("node_features", "global_features", "actions", "growth_modes"):
        if manifest.get(key) != want[key]:
            have, need = manifest.get(key) or [], want[key]
            diff = sorted(set(map(str, have)) ^ set(map(str, need)))[:6]
            raise PolicyLoadError(f"{where}: the policy's {key} ({len(have)}) differ from this Tamiyo's ({len(need)}), "
                                  f"e.g. {diff}; expected a policy trained on the same blueprint catalog and "
                                  "growth modes")


def model_from_bytes(manifest: dict[str, Any], data: bytes, where: str) -> TamiyoGNN:
    """A TamiyoGNN from manifest + safetensors bytes (checksum and tensor shapes verified)."""
    from safetensors.torch import load

    if _sha256(data) != manifest.get("weights_sha256"):
        raise PolicyLoadError(f"{where}: weights do not match weights_sha256 in the manifest; expected the file "
                              "written with it (corrupt or replaced)")
    try:
        arch = Architecture(**manifest["architecture"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PolicyLoadError(f"{where}: bad architecture in the manifest ({exc})") from None
    model = TamiyoGNN(arch)
    try:
        tensors = load(data)
        model.load_state_dict(tensors, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise PolicyLoadError(f"{where}: weights do not fit the architecture ({str(exc).splitlines()[0]})") from None
    model.eval()
    return model


def load_policy(directory: Path | str) -> LoadedPolicy:
    """The policy in `directory` (see the module docstring for what is checked)."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    check_layout(manifest, str(directory))
    weights = directory / str(manifest.get("weights_file", ""))
    try:
        data = weights.read_bytes()
    except OSError as exc:
        raise PolicyLoadError(f"{weights}: cannot read the policy weights ({exc.strerror})") from None
    return LoadedPolicy(model_from_bytes(manifest, data, str(directory)), manifest, str(directory))


def manifest_version(directory: Path | str) -> str | None:
    """The version named by the manifest in `directory`, or None when there is none readable."""
    try:
        return str(_read_manifest(Path(directory))["version"])
    except (PolicyLoadError, KeyError):
        return None


__all__ = ["FORMAT", "LoadedPolicy", "PolicyLoadError", "check_layout", "expected_layout", "load_policy",
           "manifest_version", "model_from_bytes", "policy_bytes", "save_policy"]
