"""Generates the Python contracts in esper/v1/ from proto/esper/v1/*.proto.

Used by `make proto` and by tests/test_contracts_drift.py (which generates into a temporary
directory and compares). Outputs `*_pb2.py`, `*_pb2_grpc.py` and `.pyi` stubs (mypy-protobuf).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE_DIR = Path("esper") / "v1"

_INIT = '"""Generated protobuf and gRPC code for esper.v1. Regenerate with `make proto`; do not edit."""\n'


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Generate into `out_root/esper/v1/`; returns the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    bin_dir = Path(sys.executable).parent
    plugins = {name: bin_dir / f"protoc-gen-{name}" for name in ("mypy", "mypy_grpc")}
    for name, path in plugins.items():
        if not path.exists():
            raise RuntimeError(f"protoc plugin protoc-gen-{name} not found next to {sys.executable}; "
                               "install mypy-protobuf (make build does)")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_dir = out_root / PACKAGE_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--plugin=protoc-gen-mypy={plugins['mypy']}",
        f"--plugin=protoc-gen-mypy_grpc={plugins['mypy_grpc']}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *files,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc} for {files}")
    (out_dir / "__init__.py").write_text(_INIT)
    return sorted(p for p in out_dir.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        target = args.out / PACKAGE_DIR
        target.mkdir(parents=True, exist_ok=True)
        for stale in target.glob("*_pb2*.py*"):
            stale.unlink()
        for path in generated:
            shutil.copy2(path, target / path.name)
    print(f"generated {len(generated)} files in {os.path.relpath(target, ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
