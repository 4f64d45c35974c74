"""`esper-bench`: the benchmark command line. Each subcommand is a module of `esper.bench`.

A module becomes the subcommand named after it (underscores as hyphens) by defining
``add_arguments(parser)`` and ``run(args) -> int``; the first paragraph of its docstring is the
help text. So `esper/bench/kernels.py` is `esper-bench kernels`, and a new benchmark needs no
edit here.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import types
from pathlib import Path
from typing import Any

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


def standalone_main(module_name: str, argv: list[str] | None = None) -> int:
    """`python -m esper.bench.<module>`: the subcommand's parser (the module's whole docstring as
    its description) and `run`, with `args.argv` as `esper-bench <name>` would pass it."""
    module = sys.modules[module_name]
    argv = list(sys.argv[1:] if argv is None else argv)
    # Under `python -m` the module is `__main__`; its spec still has the real name.
    spec = getattr(module, "__spec__", None)
    name = (spec.name if spec is not None else module_name).rsplit(".", 1)[-1].replace("_", "-")
    parser = argparse.ArgumentParser(prog=f"esper-bench {name}", description=module.__doc__)
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = argv
    return module.run(args)


def write_report(text: str, result: dict[str, Any], json_path: str | None, markdown_path: str | None) -> None:
    """Prints a benchmark's Markdown report and writes it, and its full result as JSON, where asked."""
    print(text)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2, default=float))
    if markdown_path:
        Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown_path).write_text(text)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `esper-bench` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # The subcommand's own arguments, as its standalone `main(argv)` would receive them.
    args.argv = argv[argv.index(args.command) + 1 :]
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
