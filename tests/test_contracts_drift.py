"""The committed esper/v1 code must be exactly what proto/esper/v1/*.proto generates."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_generator():
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_matches_protos(tmp_path):
    generator = _load_generator()
    generated = {p.name: p.read_bytes() for p in generator.generate(tmp_path)}
    committed_dir = ROOT / "esper" / "v1"
    committed = {p.name: p.read_bytes() for p in committed_dir.iterdir() if p.is_file() and p.suffix in (".py", ".pyi")}
    assert sorted(generated) == sorted(committed), "files differ: run `make proto` and commit esper/v1"
    stale = [name for name in generated if generated[name] != committed[name]]
    assert not stale, f"esper/v1 is out of date for {stale}: run `make proto` and commit the result"


def test_every_service_proto_is_generated():
    protos = sorted(p.stem for p in (ROOT / "proto" / "esper" / "v1").glob("*.proto"))
    for stem in protos:
        assert (ROOT / "esper" / "v1" / f"{stem}_pb2.py").exists(), stem
