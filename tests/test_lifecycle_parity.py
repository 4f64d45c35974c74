"""The proto enum is the source of truth; the C++ header and the Python enum must mirror it."""

from esper import load_extension
from esper.lifecycle import PROTO_PREFIX, SeedLifecycleState
from esper.v1 import common_pb2


def _proto_states() -> dict[str, int]:
    return {name.removeprefix(PROTO_PREFIX): value for name, value in common_pb2.SeedLifecycleState.items()}


def test_proto_has_eleven_states_plus_unspecified():
    states = _proto_states()
    assert states["UNSPECIFIED"] == 0
    assert len(states) == 12


def test_python_enum_matches_proto():
    assert {m.name: int(m) for m in SeedLifecycleState} == _proto_states()


def test_cpp_header_matches_proto():
    cpp = dict(load_extension().lifecycle_states())
    assert cpp == _proto_states()
