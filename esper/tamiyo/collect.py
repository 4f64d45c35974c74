"""``esper-tamiyo collect``: exploration runs that fill a replay directory with scored field reports.

    esper-tamiyo collect --out replay/ --tasks digits-mlp,teacher-mlp,digits-cnn1d --seeds 0-9 --jobs 2

The plan is every (task, size, seed, behaviour) combination. Behaviours:
  random        `RandomPolicy` (wait with probability 0.5, else a uniform legal action)
  eps<E>        epsilon-greedy around the heuristic, e.g. eps0.3 (a random legal action with probability E)
Episodes run with ``growth.modes`` set to `--growth-modes` (default branch, width and depth), so
both behaviours explore every growth mode the run allows (the heuristic chooses among them too).
Each episode is one in-process run (`esper.tamiyo.episodes`); its decisions become field reports
(`esper.tamiyo.recording`: whole graph, outcome, FLOP cost, reward, and the decision the config's
heuristic would have made on that graph, whatever the behaviour, as a prior for training) in
``<out>/episodes/<episode id>/field_reports.bin`` (the replay-buffer format), and a ``done.json``
written last marks it complete. With ``--shadows`` every (task, size, seed) also gets a no-growth
shadow run (same data split, batch order and host; the rails allow no adaptation), whose final
validation accuracy and FLOPs are kept in ``<out>/shadows/<task>.<size>.s<seed>/done.json``: the
paired baseline of the ``shadow-return`` reward (`esper.tamiyo.reward`). Re-running the same command skips complete episodes and redoes
incomplete ones, so a killed collection resumes where it stopped. Episodes run in `--jobs`
worker processes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from esper.tamiyo.episodes import TASKS, TaskError

BEHAVIOURS_HELP = "random, or eps<E> for epsilon-greedy around the heuristic (e.g. eps0.3)"


@dataclass(frozen=True)
class EpisodeSpec:
    task: str
    size: str
    seed: int
    behaviour: str

    @property
    def episode_id(self) -> str:
        return f"{self.task}.{self.size}.s{self.seed}.{self.behaviour}"


def parse_seeds(text: str) -> list[int]:
    """'0-4,7' -> [0, 1, 2, 3, 4, 7]."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"--seeds: {part!r} is not a seed or a range; expected e.g. 0-9 or 0,3,5") from None
    if not out:
        raise ValueError("--seeds: no seeds given; expected e.g. 0-9")
    return out


def parse_behaviour(text: str) -> float | None:
    """None for random, epsilon for eps<E>; ValueError naming what is expected otherwise."""
    if text == "random":
        return None
    if text.startswith("eps"):
        try:
            eps = float(text[3:])
        except ValueError:
            eps = -1.0
        if 0.0 <= eps <= 1.0:
            return eps
    raise ValueError(f"--behaviours: unknown behaviour {text!r}; expected {BEHAVIOURS_HELP}")


def plan(tasks: list[str], seeds: list[int], behaviours: list[str], sizes: list[str] | None = None) -> list[EpisodeSpec]:
    """Every (task, size, seed, behaviour); `sizes` None means every size of each task."""
    for b in behaviours:
        parse_behaviour(b)
    out = []
    for task in tasks:
        if task not in TASKS:
            raise TaskError(f"--tasks: unknown task {task!r}; expected some of {sorted(TASKS)}")
        task_sizes = list(TASKS[task].sizes) if not sizes else [s for s in sizes if s in TASKS[task].sizes]
        for size in task_sizes:
            for seed in seeds:
                for behaviour in behaviours:
                    out.append(EpisodeSpec(task, size, seed, behaviour))
    return out


def _exploration_controller(spec: EpisodeSpec):
    from esper.tamiyo.exploration import EpsilonGreedyPolicy, GrowthSpace, RandomPolicy
    from esper.tamiyo.heuristic import HeuristicPolicy
    from esper.tamiyo.rails import Controller
    from esper.tamiyo.recording import RecordingController

    eps = parse_behaviour(spec.behaviour)

    def wrap(controller):
        heuristic = controller.policy
        if not isinstance(heuristic, HeuristicPolicy):
            raise TypeError(f"collection expects the task config's controller.policy to be the heuristic, got "
                            f"{type(heuristic).__name__}")
        rails = controller.rails.cfg
        # The config's heuristic knows what the run lets a policy grow (blueprints, growth modes).
        explore = RandomPolicy(rails, seed=spec.seed * 1009 + 17, space=GrowthSpace.of(heuristic.cfg))
        policy = explore if eps is None else EpsilonGreedyPolicy(heuristic, explore, eps, spec.seed)
        # A separate instance, so asking it for the reference never touches the behaviour's state.
        reference = HeuristicPolicy(heuristic.cfg, heuristic.rails, heuristic.host_flops)
        return RecordingController(Controller(policy, controller.rails), reference=reference)

    return wrap


DEFAULT_GROWTH_MODES = ("branch", "width", "depth")


def run_one(spec: EpisodeSpec, out_dir: str, growth_modes: tuple[str, ...] = DEFAULT_GROWTH_MODES) -> dict:
    """Runs one episode with `growth_modes` allowed and writes its reports; returns its done record."""
    import torch

    from esper.tamiyo.episodes import run_episode, task_config
    from esper.tamiyo.recording import field_reports
    from esper.tamiyo.replay import ReplayBuffer

    torch.set_num_threads(1)
    root = Path(out_dir) / "episodes" / spec.episode_id
    if root.exists():
        shutil.rmtree(root)  # an incomplete earlier attempt
    work = root / "run"
    t0 = time.perf_counter()
    cfg = task_config(spec.task, spec.size, spec.seed, (f"growth.modes=[{','.join(growth_modes)}]",))
    cfg.run_name = spec.episode_id
    episode = run_episode(cfg, work, _exploration_controller(spec))
    reports = field_reports(episode.records, episode.summary, train_samples=episode.train_samples,
                            val_samples=episode.val_samples, total_epochs=episode.total_epochs)
    buffer = ReplayBuffer(root)
    try:
        for r in reports:
            buffer.append(r)
    finally:
        buffer.close()
    shutil.rmtree(work, ignore_errors=True)
    done = {**asdict(spec), "episode_id": spec.episode_id, "reports": len(reports),
            "germinations": sum(1 for r in reports if r.decision.action == 2),
            "final_val_acc": episode.summary["final_val_acc"],
            "test_acc": episode.summary["test_acc"], "flops_total": episode.summary["flops"]["total"],
            "seeds": episode.summary["seeds"], "growth_modes": list(growth_modes),
            "wall_s": round(time.perf_counter() - t0, 3)}
    (root / "done.json").write_text(json.dumps(done, sort_keys=True))
    return done


def run_shadow(spec: EpisodeSpec, out_dir: str) -> dict:
    """Runs the no-growth shadow of `spec`'s task, size and seed (same data split, batch order and
    host; the rails allow no adaptation) and writes its done record; it logs no field reports."""
    import torch

    from esper.tamiyo.episodes import run_episode, task_config

    torch.set_num_threads(1)
    root = shadow_dir(Path(out_dir), spec)
    if root.exists():
        shutil.rmtree(root)
    t0 = time.perf_counter()
    cfg = task_config(spec.task, spec.size, spec.seed, ("controller.max_adaptations=0",))
    cfg.run_name = f"shadow.{spec.task}.{spec.size}.s{spec.seed}"
    summary = run_episode(cfg, root / "run").summary
    shutil.rmtree(root / "run", ignore_errors=True)
    done = {"task": spec.task, "size": spec.size, "seed": spec.seed, "behaviour": SHADOW,
            "final_val_acc": summary["final_val_acc"], "test_acc": summary["test_acc"],
            "flops_total": summary["flops"]["total"], "germinations": len(summary["adaptations"]),
            "wall_s": round(time.perf_counter() - t0, 3)}
    (root / "done.json").write_text(json.dumps(done, sort_keys=True))
    return done


SHADOW = "shadow"


def shadow_dir(out_dir: Path, spec: EpisodeSpec) -> Path:
    """Where the no-growth shadow of `spec`'s (task, size, seed) keeps its done record."""
    return out_dir / "shadows" / f"{spec.task}.{spec.size}.s{spec.seed}"


def shadow_specs(specs: list[EpisodeSpec]) -> list[EpisodeSpec]:
    """One shadow per distinct (task, size, seed) of `specs`."""
    seen: dict[tuple[str, str, int], EpisodeSpec] = {}
    for s in specs:
        seen.setdefault((s.task, s.size, s.seed), EpisodeSpec(s.task, s.size, s.seed, SHADOW))
    return list(seen.values())


def is_done(spec: EpisodeSpec, out_dir: Path) -> bool:
    if spec.behaviour == SHADOW:
        return (shadow_dir(out_dir, spec) / "done.json").is_file()
    return (out_dir / "episodes" / spec.episode_id / "done.json").is_file()


def _run(spec: EpisodeSpec, out_dir: str, growth_modes: tuple[str, ...]) -> dict:
    if spec.behaviour == SHADOW:
        return run_shadow(spec, out_dir)
    return run_one(spec, out_dir, growth_modes)


def collect(specs: list[EpisodeSpec], out_dir: Path, jobs: int = 1, echo=print,
            growth_modes: tuple[str, ...] = DEFAULT_GROWTH_MODES, shadows: bool = False) -> dict:
    """Runs the episodes not yet complete in `out_dir` (and, with `shadows`, the no-growth shadow
    of every task, size and seed); returns totals (also in ``collection.json``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shadow_plan = shadow_specs(specs) if shadows else []
    todo = [s for s in [*shadow_plan, *specs] if not is_done(s, out_dir)]
    planned = len(specs) + len(shadow_plan)
    echo(f"collect: {planned} episodes planned ({len(shadow_plan)} no-growth shadows), {planned - len(todo)} already "
         f"complete, {len(todo)} to run with {jobs} job(s)")
    t0 = time.perf_counter()
    failures: list[str] = []
    finished = 0
    if jobs <= 1:
        for spec in todo:
            done = _run(spec, str(out_dir), growth_modes)
            finished += 1
            echo(f"  [{finished}/{len(todo)}] {spec.episode_id}: {done.get('reports', 0)} reports, "
                 f"{done['germinations']} germinations, test acc {done['test_acc']:.4f} ({done['wall_s']:.1f} s)")
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(_run, spec, str(out_dir), growth_modes): spec for spec in todo}
            for fut in as_completed(futures):
                spec = futures[fut]
                finished += 1
                try:
                    done = fut.result()
                except Exception as exc:  # one broken episode must not lose the others
                    failures.append(f"{spec.episode_id}: {type(exc).__name__}: {exc}")
                    echo(f"  [{finished}/{len(todo)}] {spec.episode_id}: FAILED {type(exc).__name__}: {exc}")
                    continue
                echo(f"  [{finished}/{len(todo)}] {spec.episode_id}: {done.get('reports', 0)} reports, "
                     f"{done['germinations']} germinations, test acc {done['test_acc']:.4f} ({done['wall_s']:.1f} s)")
    records = [json.loads((out_dir / "episodes" / s.episode_id / "done.json").read_text())
               for s in specs if is_done(s, out_dir)]
    totals = {"episodes_planned": len(specs), "episodes_complete": len(records),
              "shadows_complete": sum(1 for s in shadow_plan if is_done(s, out_dir)),
              "reports": sum(r["reports"] for r in records),
              "germinations": sum(r["germinations"] for r in records), "growth_modes": list(growth_modes),
              "tasks": sorted({s.task for s in specs}), "behaviours": sorted({s.behaviour for s in specs}),
              "seeds": sorted({s.seed for s in specs}), "wall_s_this_call": round(time.perf_counter() - t0, 1),
              "episode_wall_s_sum": round(sum(r["wall_s"] for r in records), 1), "failures": failures}
    (out_dir / "collection.json").write_text(json.dumps(totals, indent=2, sort_keys=True))
    return totals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="esper-tamiyo collect",
                                description="Exploration runs that fill a replay directory with field reports.")
    p.add_argument("--out", type=Path, required=True, help="replay directory (created; resumed when it exists)")
    p.add_argument("--tasks", default="digits-mlp,teacher-mlp,digits-cnn1d",
                   help=f"comma-separated tasks, some of {', '.join(sorted(TASKS))}")
    p.add_argument("--sizes", default="", help="comma-separated host sizes (default: every size of each task)")
    p.add_argument("--seeds", default="0-4", help="run seeds, e.g. 0-9 or 0,2,4")
    p.add_argument("--behaviours", default="random,eps0.3", help=f"comma-separated; each is {BEHAVIOURS_HELP}")
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.add_argument("--shadows", action="store_true",
                   help="also run a no-growth shadow of every task, size and seed (for esper-tamiyo-train "
                        "--reward shadow-return)")
    p.add_argument("--growth-modes", default=",".join(DEFAULT_GROWTH_MODES),
                   help="comma-separated growth modes the episodes allow (growth.modes): some of branch, width, depth")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
        specs = plan([t.strip() for t in args.tasks.split(",") if t.strip()], parse_seeds(args.seeds),
                     [b.strip() for b in args.behaviours.split(",") if b.strip()],
                     [s.strip() for s in args.sizes.split(",") if s.strip()] or None)
        modes = tuple(m.strip() for m in args.growth_modes.split(",") if m.strip())
        bad = [m for m in modes if m not in DEFAULT_GROWTH_MODES]
        if bad or not modes:
            raise ValueError(f"--growth-modes: {args.growth_modes!r}; expected some of {', '.join(DEFAULT_GROWTH_MODES)}")
    except ValueError as exc:
        print(f"esper-tamiyo collect: error: {exc}", file=sys.stderr)
        return 2
    totals = collect(specs, args.out, args.jobs, growth_modes=modes, shadows=args.shadows)
    print(json.dumps(totals, indent=2, sort_keys=True))
    return 1 if totals["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
