"""`esper-bench`: the benchmark command line. Each subcommand is a module of `esper.bench`.

A module becomes the subcommand named after it (underscores as hyphens) by defining
``add_arguments(parser)`` and ``run(args) -> int``; the first paragraph of its docstring is the
help text. So `esper/bench/kernels.py` is `esper-bench kernels`, and a new benchmark needs no
edit here.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import types

import esper.bench


def subcommand_modules() -> dict[str, types.ModuleType]:
    """Subcommand name -> module, for every `esper.bench` module with `add_arguments` and `run`."""
    found: dict[str, types.ModuleType] = {}
    for info in sorted(pkgutil.iter_modules(esper.bench.__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name == "cli":
            continue
        module = importlib.import_module(f"esper.bench.{info.name}")
        if callable(getattr(module, "add_arguments", None)) and callable(getattr(module, "run", None)):
            found[info.name.replace("_", "-")] = module
    return found


def build_parser() -> argparse.ArgumentParser:
    """The `esper-bench` parser with one subparser per benchmark module."""
    parser = argparse.ArgumentParser(prog="esper-bench", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in subcommand_modules().items():
        summary = (module.__doc__ or name).strip().split("\n\n")[0]
        sub = subparsers.add_parser(name, help=summary.splitlines()[0], description=summary)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `esper-bench` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # The subcommand's own arguments, as its standalone `main(argv)` would receive them.
    args.argv = argv[argv.index(args.command) + 1 :]
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
