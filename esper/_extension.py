"""Loads the compiled Kasmina extension `esper._C` with an error that says how to build it."""

from __future__ import annotations

import importlib
import types

_BUILD_HINT = (
    "the Esper C++ extension `esper._C` is not built (or was built for another torch/Python). "
    "Build it with `make build` from the repository root "
    "(or `python setup.py build_ext --inplace` inside the project's .venv)."
)


class ExtensionNotBuiltError(ImportError):
    """Raised when `esper._C` cannot be imported."""


_module: types.ModuleType | None = None


def load() -> types.ModuleType:
    global _module
    if _module is None:
        import torch  # noqa: F401  (libtorch must be loaded before the extension)

        try:
            _module = importlib.import_module("esper._C")
        except ImportError as exc:
            raise ExtensionNotBuiltError(f"{_BUILD_HINT} Import failed with: {exc}") from exc
    return _module
