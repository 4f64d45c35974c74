"""A few paired seeds of `esper-bench growth`'s four arms on any config (e.g. a width-growth host).

    PYTHONPATH=. python benchmarks/growth_width_pilot.py configs/teacher_student_narrow.yaml 4 /tmp/ts [KEY=VALUE ...]

Runs `esper.bench.growth.run_seed` (host, esper, target, target@matched) for seeds 0..N-1 with the
overrides, prints one line per seed and the benchmark's table, and writes OUT.md and OUT.json. A
pilot, not the benchmark: `esper-bench growth` (20 paired seeds, learning-rate grid) is the
reference protocol.
"""

from __future__ import annotations

import json
import sys
import time

from esper.bench.growth import ARMS, aggregate, run_seed, to_markdown


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    config, n, out, overrides = argv[0], int(argv[1]), argv[2], argv[3:]
    start = time.time()
    per_seed = []
    for s in range(n):
        r = run_seed(config, s, overrides, out + "_runs")
        per_seed.append(r)
        print(f"seed {s}: " + ", ".join(f"{a} {100 * r[a]['test_acc']:.2f}" for a in ARMS)
              + f" | esper params {r['esper']['params_final']} target width {r['target']['width']}", flush=True)
    result = {"dataset": config, "config": config, "seeds": n, "wall_s": time.time() - start,
              "aggregate": aggregate(per_seed)}
    text = to_markdown(result, "PYTHONPATH=. python benchmarks/growth_width_pilot.py " + " ".join(argv))
    print(text)
    keep = ("test_acc", "params_final", "flops", "wall_s", "adaptations")
    with open(out + ".json", "w") as f:
        json.dump({"per_seed": [{a: {k: r[a][k] for k in keep} for a in ARMS} for r in per_seed],
                   "aggregate": result["aggregate"]}, f, indent=1, default=float)
    with open(out + ".md", "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
