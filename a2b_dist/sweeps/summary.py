"""The summary of a finished (or interrupted) sweep (submit side: runs in ``a2b tune`` only):
the table of trials sorted by the metric, trials.csv, best.yaml and the metric-against-value plot."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from a2b_dist.config import Config, to_yaml
from a2b_dist.files import atomic_path, write_atomic
from a2b_dist.sweeps.space import Param
from a2b_dist.sweeps.trial import apply_params


@dataclass
class TrialRow:
    trial_id: str
    status: str                 # completed | stopped early | error | not finished
    evaluations: int
    step: Optional[int]
    best: Optional[float]       # best value of the metric over the trial's evaluations
    best_step: Optional[int]
    last: Optional[float]
    params: dict
    run_dir: str


def summarize(results: Sequence[dict], metric: str, higher_is_better: bool, steps: int) -> list[TrialRow]:
    """One row per trial, best first. ``results``: dicts with trial_id, params, history (the
    reported rows, oldest first), error (bool), run_dir."""
    rows = []
    for r in results:
        history = [h for h in r["history"] if h.get(metric) is not None and not math.isnan(h[metric])]
        best_row = (max if higher_is_better else min)(history, key=lambda h: h[metric]) if history else None
        last_step = int(r["history"][-1]["step"]) if r["history"] else None
        if r["error"]:
            status = "error"
        elif last_step is not None and last_step >= steps:
            status = "completed"
        elif r.get("finished"):
            status = "stopped early"
        else:
            status = "not finished"
        rows.append(TrialRow(r["trial_id"], status, len(r["history"]), last_step,
                             best_row[metric] if best_row else None,
                             int(best_row["step"]) if best_row else None,
                             history[-1][metric] if history else None, dict(r["params"]), r["run_dir"]))
    sign = -1.0 if higher_is_better else 1.0
    rows.sort(key=lambda t: (t.best is None, sign * t.best if t.best is not None else 0.0, t.trial_id))
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table_columns(rows: Sequence[TrialRow], metric: str) -> tuple[list[str], list[list[Any]]]:
    keys = sorted({k for t in rows for k in t.params})
    header = ["trial", "status", "evaluations", "step", f"best_{metric}", "best_step", f"last_{metric}", *keys,
              "run_dir"]
    body = [[t.trial_id, t.status, t.evaluations, t.step, t.best, t.best_step, t.last,
             *(t.params.get(k) for k in keys), t.run_dir] for t in rows]
    return header, body


def format_table(rows: Sequence[TrialRow], metric: str) -> str:
    """Plain-text table (without the run folders) for the terminal."""
    header, body = table_columns(rows, metric)
    header, body = header[:-1], [b[:-1] for b in body]
    cells = [header] + [[_fmt(v) for v in b] for b in body]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(header))).rstrip() for c in cells)


def write_csv(path: Path, rows: Sequence[TrialRow], metric: str) -> None:
    header, body = table_columns(rows, metric)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows([["" if v is None else v for v in b] for b in body])
    write_atomic(path, buf.getvalue())


def fresh_dir(parent: Path, name: str) -> Path:
    """parent/name, or parent/name-2, -3 ... : the first that does not exist yet."""
    candidate, n = parent / name, 1
    while candidate.exists():
        n += 1
        candidate = parent / f"{name}-{n}"
    return candidate


def write_best(path: Path, base: dict, best: TrialRow, metric: str, run_dir: Path) -> Config:
    """best.yaml: the best trial's resolved config with a fresh run folder, for `a2b train --config`."""
    cfg = apply_params(base, best.params, run_dir)
    header = (f"# Best trial {best.trial_id} of the sweep: {metric} {best.best:.6g} at step {best.best_step}.\n"
              f"# Its own run folder (checkpoints, metrics): {best.run_dir}\n"
              f"# Train it again:            a2b train --config {path}\n"
              f"# On the full schedule, e.g.: a2b train --config {path} train.steps=400000 "
              "optim.decay_steps=100000\n")
    write_atomic(path, header + to_yaml(cfg))
    return cfg


def plot_params(path: Path, rows: Sequence[TrialRow], space: dict[str, Param], metric: str) -> None:
    """One panel per searched field: each trial's best metric against its value (best trial in red)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [t for t in rows if t.best is not None]
    keys = list(space)
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        param = space[key]
        xs = [t.params.get(key) for t in rows]
        ys = [t.best for t in rows]
        if param.dist == "choice":
            labels = [str(v) for v in param.values]
            xs = [labels.index(str(x)) if str(x) in labels else math.nan for x in xs]
            ax.set_xticks(range(len(labels)), labels)
        elif param.dist == "loguniform":
            ax.set_xscale("log")
        ax.scatter(xs, ys, c=["tab:red" if i == 0 else "tab:blue" for i in range(len(rows))], s=24)
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {metric}")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"{metric} against each searched value ({len(rows)} trials; red: best)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
