import subprocess
import sys
import textwrap

import pytest
import torch

from esper import SeedLifecycleState, load_extension

load_extension()


def test_count_states_counts_each_state():
    table = torch.tensor([1, 1, 3, 8, 8, 8, 9], dtype=torch.int64)
    counts = torch.ops.esper.count_states(table)
    assert counts.dtype == torch.int64 and counts.shape == (12,)
    assert counts[SeedLifecycleState.DORMANT] == 2
    assert counts[SeedLifecycleState.TRAINING] == 1
    assert counts[SeedLifecycleState.FOSSILIZED] == 3
    assert counts[SeedLifecycleState.CULLED] == 1
    assert int(counts.sum()) == table.numel()
    assert torch.equal(counts, torch.bincount(table, minlength=12))


def test_count_states_rejects_bad_input():
    with pytest.raises(RuntimeError, match="expected an int64 state table"):
        torch.ops.esper.count_states(torch.zeros(3))
    with pytest.raises(RuntimeError, match="is not a SeedLifecycleState"):
        torch.ops.esper.count_states(torch.tensor([1, 42]))


def test_count_states_opcheck():
    torch.library.opcheck(torch.ops.esper.count_states.default, (torch.tensor([1, 2, 2, 11]),),
                          test_utils=("test_schema", "test_faketensor"))


def test_missing_extension_says_how_to_build():
    # Simulate an unbuilt extension: Python treats a None entry in sys.modules as "cannot import".
    code = textwrap.dedent(
        """
        import sys
        sys.modules["esper._C"] = None
        import esper
        try:
            esper.load_extension()
        except ImportError as exc:
            print(type(exc).__name__, exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("ExtensionNotBuiltError")
    assert "make build" in out.stdout
