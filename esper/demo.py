"""`make demo`: runs the main job on the bundled default, or says honestly what is not there yet."""

from __future__ import annotations

import sys


def main() -> int:
    import torch

    from esper import SeedLifecycleState, load_extension

    load_extension()
    table = torch.full((8,), int(SeedLifecycleState.DORMANT), dtype=torch.int64)
    counts = torch.ops.esper.count_states(table)
    print("Esper foundation is installed: contracts (esper.v1), the Kasmina extension (esper._C).")
    print(f"esper.count_states on an 8-seed table: {int(counts[SeedLifecycleState.DORMANT])} DORMANT")
    print("The training job (esper-train) is not implemented yet; `make demo` will run it once it lands.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
