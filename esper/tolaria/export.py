"""`esper-export RUN_DIR`: the final grown model as a torch.export program, safetensors and a manifest.

    esper-export runs/demo                      # latest checkpoint -> runs/demo/export/
    esper-export runs/demo --which best --output-dir /tmp/model

Writes `program.pt2` (torch.export, dynamic batch), `weights.safetensors` and `manifest.json`
(architecture: host config, seed sites and the blueprint, state and alpha of every seed, merged
width growth). Seed sites with no seed left in their forward pass are unwrapped, so a model whose
width seeds were all merged exports as a plain network of its grown width. The exported program is checked against the rebuilt model on random inputs before anything is
written; loading it needs the `esper` package (the Kasmina ops it calls) imported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from esper.durable import write_json_atomic
from esper.tolaria import checkpoint as ckpt
from esper.tolaria.config import ConfigError, from_dict
from esper.tolaria.hosts import build_host, count_parameters

USAGE_ERROR = 2


class ExportError(ValueError):
    """The run cannot be exported (no checkpoint, outputs differ, ...)."""


def rebuild_model(payload: dict[str, Any]) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """The grown model of a checkpoint on the CPU, in eval mode, plus its per-sample input shape."""
    from esper.tolaria.morphogenesis import Morphogenesis

    config = from_dict(payload["config"])
    input_shape = tuple(int(d) for d in payload["input_shape"])
    host = build_host(config.model, input_shape, int(payload["num_classes"]))
    params = count_parameters(host)
    morph = Morphogenesis(host, config, run_id=config.run_name, input_shape=input_shape,
                          device=torch.device("cpu"), params_initial=params, flops_initial=0.0, enabled=False)
    model = morph.model
    morph.restore_structure(payload["morph"])  # merged width growth: the wider host modules
    model.load_state_dict(payload["model"])
    model.eval()
    return model, input_shape


def unwrap_dormant(model: torch.nn.Module) -> torch.nn.Module:
    """Replaces every seed site with no seed in its forward pass by its host module (in place).

    What a merged width seed leaves is then a plain network: nn.Linear / nn.Conv* modules of the
    grown width, the same architecture, parameters and FLOPs as a static model of that width.
    """
    from esper.kasmina import KasminaLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, KasminaLayer) and module.num_active == 0:
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], module.host)
    return model


def export_run(run_dir: Path, output_dir: Path | None = None, which: str = "last", atol: float = 1e-5) -> dict[str, Any]:
    """Exports a run's grown model; returns the manifest (also written as manifest.json)."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    if which == "best":
        best = ckpt.read_best(run_dir)
        if best is None:
            raise ExportError(f"run '{run_dir}' has no best checkpoint record; expected checkpoints/best.json")
        source = ckpt.checkpoint_root(run_dir) / best["dir"]
    elif which == "last":
        source = run_dir
    else:
        source = Path(which)
    payload = ckpt.load_checkpoint(source)
    if "input_shape" not in payload:
        raise ExportError(f"checkpoint '{payload['path']}' predates export support; expected input_shape in it")
    model, input_shape = rebuild_model(payload)
    from esper.kasmina import seed_sites

    seeds = []
    for name, layer in seed_sites(model):
        for row in layer.seed_table():
            seeds.append({"layer": name, "seed": row.seed, "state": row.state.name, "alpha": row.alpha,
                          "blueprint": row.blueprint_id, "parameters": row.parameter_count,
                          "chunk_size": row.chunk_size})
    unwrap_dormant(model)
    plain = not seed_sites(model)
    batch = torch.export.Dim("batch", min=2, max=65536)
    example = torch.randn(4, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        probe = torch.randn(7, *input_shape, generator=torch.Generator().manual_seed(1))
        expected = model(probe)
        got = program.module()(probe)
    diff = float((expected - got).abs().max())
    if not diff <= atol:
        raise ExportError(f"the exported program differs from the model by {diff:.3g} (> {atol}); nothing written")

    out = Path(output_dir) if output_dir else run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(out / "program.pt2"))
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    save_file(tensors, str(out / "weights.safetensors"))
    config = payload["config"]
    growth = (payload["morph"].get("growth") or {}).get("merged", [])
    manifest = {
        "format": "esper.export/1",
        "source_checkpoint": payload["path"],
        "epoch": payload["epoch"],
        "input_shape": [-1, *input_shape],
        "num_classes": int(payload["num_classes"]),
        "model": config["model"],
        "dataset": config["data"]["name"],
        "seed_sites": sorted({s["layer"] for s in seeds}),
        "seeds_per_site": config["seeds"]["num_seeds"],
        "seeds": seeds,
        "parameters": count_parameters(model),
        # True when no seed runs any more: the program is a plain network (merged width included).
        "plain": plain,
        "width_growth": [{"pair": key, "units": units} for key, units in growth],
        "depth_growth": [{"stack": stack, "init": mode}
                         for stack, mode in (payload["morph"].get("growth") or {}).get("deepened", [])],
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "verification": {"max_abs_diff": diff, "atol": atol, "batch_sizes": [4, 7]},
        "torch": torch.__version__,
        "requires": "import esper.kasmina before torch.export.load (the program calls torch.ops.esper.*)",
    }
    write_json_atomic(out / "manifest.json", manifest, indent=2)
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `esper-export` console script."""
    parser = argparse.ArgumentParser(prog="esper-export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="an esper-train run directory")
    parser.add_argument("--which", default="last", help="last (default), best, or a checkpoint directory")
    parser.add_argument("--output-dir", help="where to write (default RUN_DIR/export)")
    args = parser.parse_args(argv)
    try:
        manifest = export_run(Path(args.run_dir), Path(args.output_dir) if args.output_dir else None, args.which)
    except (ckpt.CheckpointError, ConfigError, ExportError) as exc:
        print(f"esper-export: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return USAGE_ERROR
    out = Path(args.output_dir) if args.output_dir else Path(args.run_dir) / "export"
    grown = sum(1 for s in manifest["seeds"] if s["blueprint"])
    print(f"exported {manifest['parameters']} parameters ({grown} grown seeds) to {out} "
          f"(max |diff| {manifest['verification']['max_abs_diff']:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
