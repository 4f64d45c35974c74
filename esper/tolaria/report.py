"""What a run shows and leaves behind: progress, the summary table, summary.json, the timeline PNG."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from esper.durable import write_json_atomic
from esper.lifecycle import SeedLifecycleState as S

STATE_COLORS = {
    S.DORMANT: "#d9d9d9",
    S.GERMINATED: "#c6dbef",
    S.TRAINING: "#6baed6",
    S.GRAFTING: "#fdae6b",
    S.STABILIZATION: "#fd8d3c",
    S.EVALUATING: "#9e9ac8",
    S.FINE_TUNING: "#74c476",
    S.FOSSILIZED: "#238b45",
    S.CULLED: "#de2d26",
    S.CANCELLED: "#969696",
    S.ROLLED_BACK: "#000000",
}


class ProgressDisplay:
    """A rich progress bar on a terminal; one plain line per epoch otherwise."""

    def __init__(self, mode: str, epochs: int, steps_per_epoch: int, verbose: bool) -> None:
        self.quiet = mode == "none"
        self.rich = mode == "rich" or (mode == "auto" and sys.stdout.isatty())
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.verbose = verbose
        self._progress = None
        self._task = None

    def __enter__(self) -> ProgressDisplay:
        if self.rich:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("train", total=self.epochs * self.steps_per_epoch, info="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def step_done(self, loss: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, info=f"loss {loss:.4f}")

    def epoch_done(self, record, seeds: str) -> None:
        line = (
            f"epoch {record.epoch}/{self.epochs} train_loss {record.train_loss:.4f} "
            f"train_acc {record.train_acc:.4f} val_loss {record.val_loss:.4f} val_acc {record.val_acc:.4f} "
            f"lr {record.lr:.3g} params {record.params} seeds [{seeds}] {record.wall_s:.1f}s"
        )
        self.print(line)

    def print(self, line: str) -> None:
        if self.quiet:
            return
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, flush=True)


def summary_table(summary: dict[str, Any]) -> str:
    """The end-of-run table as plain text (rich renders the same rows on a terminal)."""
    rows = [
        ("final val acc", f"{summary['final_val_acc']:.4f}" if summary["final_val_acc"] is not None else "-"),
        ("best val acc", f"{summary['best_val_acc']:.4f}"),
        ("test acc", f"{summary['test_acc']:.4f}"),
        ("params initial -> final", f"{summary['params_initial']} -> {summary['params_final']}"),
        ("seeds by final state", ", ".join(f"{k} {v}" for k, v in summary["seeds"].items()) or "-"),
        ("adaptations", str(len(summary["adaptations"]))),
        ("training FLOPs (incl. growth)", f"{summary['flops']['total']:.3e}"),
        ("wall time", f"{summary['wall_s']:.1f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{name.ljust(width)}  {value}" for name, value in rows]
    for a in summary["adaptations"]:
        contrib = a.get("contribution")
        lines.append(
            f"  epoch {a['epoch']:>3} {a['layer']}[{a['seed']}] {a['blueprint']:<22} -> {a['outcome']:<11} "
            f"contribution {contrib:+.4f}" if contrib is not None else
            f"  epoch {a['epoch']:>3} {a['layer']}[{a['seed']}] {a['blueprint']:<22} -> {a['outcome']}"
        )
    return "\n".join(lines)


def write_summary(run_dir: Path, summary: dict[str, Any], timeline: list[dict[str, Any]], plot: bool,
                  echo: ProgressDisplay | None = None) -> None:
    """Writes summary.json (and timeline.png) and prints the summary table."""
    run_dir = Path(run_dir)
    write_json_atomic(run_dir / "summary.json", summary, indent=2)
    if plot:
        plot_timeline(timeline, summary["epochs"], run_dir / "timeline.png")
    text = summary_table(summary)
    if echo is not None and echo.quiet:
        return
    if echo is not None and echo.rich:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"esper-train summary: {summary['run_name']}")
        table.add_column("metric")
        table.add_column("value")
        for line in text.splitlines():
            if line.startswith("  "):
                continue  # adaptations get their own table
            name, _, value = line.partition("  ")
            table.add_row(name.strip(), value.strip())
        console = Console()
        console.print(table)
        if summary["adaptations"]:
            adaptations = Table(title="adaptations")
            for column in ("epoch", "seed", "blueprint", "outcome", "contribution"):
                adaptations.add_column(column)
            for a in summary["adaptations"]:
                c = a.get("contribution")
                adaptations.add_row(str(a["epoch"]), f"{a['layer']}[{a['seed']}]", a["blueprint"], a["outcome"],
                                    "-" if c is None else f"{c:+.4f}")
            console.print(adaptations)
    else:
        print(text, flush=True)


def plot_timeline(timeline: list[dict[str, Any]], epochs: int, path: Path) -> None:
    """One horizontal bar per seed slot, coloured by lifecycle state over the epochs.

    `timeline` rows: {"slot": "layer[i]", "epoch": float, "state": int} in time order; each state
    lasts until the slot's next row (or the end of the run).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    slots: dict[str, list[tuple[float, int]]] = {}
    for row in timeline:
        slots.setdefault(row["slot"], []).append((float(row["epoch"]), int(row["state"])))
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.45 * max(1, len(slots))))
    names = sorted(slots)
    used = set()
    for y, name in enumerate(names):
        points = slots[name]
        for i, (start, state) in enumerate(points):
            end = points[i + 1][0] if i + 1 < len(points) else float(max(epochs, start))
            if end <= start:
                end = start + 0.05  # a transition within the same instant still shows
            ax.barh(y, end - start, left=start, color=STATE_COLORS.get(S(state), "#ffffff"), edgecolor="none")
            used.add(S(state))
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("epoch")
    ax.set_xlim(0, max(1, epochs))
    ax.set_title("seed lifecycle timeline")
    ax.legend(handles=[Patch(color=STATE_COLORS[s], label=s.name) for s in STATE_COLORS if s in used],
              loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
