"""The .proto files say what they require: every service, RPC, message, field, enum and enum value
has a comment, the ErrorInfo reasons the servers use are listed in `ErrorReason`, and the
requirements a server enforces (required fields, ranges, formats, defaults) are written down."""

from __future__ import annotations

import re
from pathlib import Path

import grpc_tools
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"

# descriptor_pb2 path numbers (descriptor.proto): FileDescriptorProto.message_type=4, enum_type=5,
# service=6; DescriptorProto.field=2, nested_type=3, enum_type=4; EnumDescriptorProto.value=2;
# ServiceDescriptorProto.method=2.


def _descriptor_set(tmp_path) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path / "set.pb"
    files = [str(p.relative_to(PROTO_ROOT)) for p in sorted((PROTO_ROOT / "esper" / "v1").glob("*.proto"))]
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", "--include_source_info",
                      f"--descriptor_set_out={out}", *files])
    assert rc == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _comments(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    return {tuple(loc.path): (loc.leading_comments + loc.trailing_comments).strip()
            for loc in file.source_code_info.location}


def _undocumented(file: descriptor_pb2.FileDescriptorProto) -> list[str]:
    comments = _comments(file)
    missing = []

    def need(path: tuple[int, ...], name: str) -> None:
        if not comments.get(path):
            missing.append(f"{file.name}: {name}")

    def message(msg, path, prefix):
        name = f"{prefix}{msg.name}"
        need(path, name)
        for i, fld in enumerate(msg.field):
            need((*path, 2, i), f"{name}.{fld.name}")
        for i, nested in enumerate(msg.nested_type):
            if not nested.options.map_entry:
                message(nested, (*path, 3, i), f"{name}.")
        for i, enum in enumerate(msg.enum_type):
            enum_(enum, (*path, 4, i), f"{name}.")

    def enum_(enum, path, prefix):
        need(path, f"{prefix}{enum.name}")
        for i, value in enumerate(enum.value):
            if not value.name.endswith("_UNSPECIFIED"):
                need((*path, 2, i), f"{prefix}{enum.name}.{value.name}")

    for i, msg in enumerate(file.message_type):
        message(msg, (4, i), "")
    for i, enum in enumerate(file.enum_type):
        enum_(enum, (5, i), "")
    for i, service in enumerate(file.service):
        need((6, i), service.name)
        for j, method in enumerate(service.method):
            need((6, i, 2, j), f"{service.name}.{method.name}")
    return missing


def test_every_element_of_every_proto_is_documented(tmp_path):
    missing = [m for f in _descriptor_set(tmp_path).file for m in _undocumented(f)]
    assert not missing, f"{len(missing)} undocumented elements, e.g. {missing[:15]}"


def test_error_reasons_used_by_the_servers_are_listed_in_the_contract():
    from esper.v1 import common_pb2

    listed = {name.removeprefix("ERROR_REASON_") for name in common_pb2.ErrorReason.keys()}  # noqa: SIM118
    used: set[str] = set()
    for path in [*ROOT.glob("esper/**/*.py"), *ROOT.glob("services/**/*.py")]:
        if "/v1/" in str(path):
            continue
        text = path.read_text()
        used |= set(re.findall(r'reason="([A-Z][A-Z0-9_]+)"', text))
        used |= set(re.findall(r'default_reason = "([A-Z][A-Z0-9_]+)"', text))
    assert used, "the scan found no reasons at all"
    assert not used - listed, f"reasons used but not listed in common.proto ErrorReason: {sorted(used - listed)}"


def test_stated_requirements_are_in_the_protos():
    text = {p.stem: p.read_text() for p in (PROTO_ROOT / "esper" / "v1").glob("*.proto")}
    required = {
        "common": ["Required", "SEED_INPUT_KIND_UNSPECIFIED", "every kind", "initial_flops_per_sample",
                   "> 0", "run_id", "kernel_id"],
        "tezzeret": ["DEVICE_TYPE_UNSPECIFIED", "D_TYPE_UNSPECIFIED", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"],
        "oona": ["LATEST", "decimal offset", "idempotency_key", "Topic names"],
        "urza": ["FAILED_PRECONDITION", "INVALID", "PERMISSION_DENIED", "next_page_token"],
    }
    for stem, phrases in required.items():
        for phrase in phrases:
            assert phrase in text[stem], f"{stem}.proto does not mention {phrase!r}"
