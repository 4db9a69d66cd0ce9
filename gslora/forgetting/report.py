"""Reports of a continual-forgetting run: the paper-style table, JSON metrics and plots.

Plots (matplotlib, Agg backend, imported only here):

* ``accuracies.png`` — Acc_r, Acc_f and Acc_o after each task, one panel per method;
* ``group_norms.png`` — heatmap of ‖θ_g‖ (group × task) of GS-LoRA before each merge: the
  blocks GS-LoRA chose (exact zeros are drawn white and counted in the title).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .engine import _atomic_write, _write_json

__all__ = ["format_table", "summary_rows", "write_report", "plot_accuracies", "plot_group_norms"]


def _f(v: float | None, width: int = 6, prec: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-".rjust(width)
    return f"{v:{width}.{prec}f}"


def format_table(results: Mapping[str, Sequence[Mapping[str, Any]]],
                 pretrained_acc: float | None = None) -> str:
    """One row per (task, method): Acc_r, Acc_f, Acc_o, Drop, H-Mean (percent), zero groups,
    trainable-parameter ratio, wall time; plus the per-method mean over tasks."""
    head = (f"{'task':<12}{'method':<9}{'Acc_r':>7}{'Acc_f':>7}{'Acc_o':>7}{'Drop':>7}"
            f"{'H-Mean':>8}{'zero grp':>10}{'train %':>9}{'time s':>8}")
    lines = []
    if pretrained_acc is not None:
        lines.append(f"pre-trained model: test accuracy {pretrained_acc:.2f}% (all classes)")
    lines += [head, "-" * len(head)]
    n_tasks = max((len(v) for v in results.values()), default=0)
    for t in range(n_tasks):
        for method, rows in results.items():
            if t >= len(rows):
                continue
            r = rows[t]
            label = f"{t + 1}: -{','.join(map(str, r['forget']))}"
            zero = "-" if r.get("zero_groups") is None else f"{r['zero_groups']}/{r['num_groups']}"
            ratio = r.get("trainable_ratio")
            lines.append(
                f"{label:<12}{method:<9}{_f(r['acc_r'], 7)}{_f(r['acc_f'], 7)}{_f(r['acc_o'], 7)}"
                f"{_f(r['drop'], 7)}{_f(r['h_mean'], 8)}{zero:>10}"
                f"{_f(None if ratio is None else 100 * ratio, 9, 2)}{_f(r['wall_s'], 8)}")
        if len(results) > 1:
            lines.append("")
    lines.append("mean over tasks:")
    for method, rows in results.items():
        m = summary_rows(rows)
        lines.append(f"{'':<12}{method:<9}{_f(m['acc_r'], 7)}{_f(m['acc_f'], 7)}{_f(m['acc_o'], 7)}"
                     f"{_f(m['drop'], 7)}{_f(m['h_mean'], 8)}{'':>10}{'':>9}{_f(m['wall_s'], 8)}")
    return "\n".join(lines)


def summary_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Mean of each metric over tasks (None where no task has it); wall_s is the total."""
    out: dict[str, float | None] = {}
    for k in ("acc_r", "acc_f", "acc_o", "drop", "h_mean"):
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = sum(vals) / len(vals) if vals else None
    out["wall_s"] = sum(r.get("wall_s", 0.0) for r in rows)
    return out


def _save_fig(fig: Any, path: Path) -> None:
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))


def plot_accuracies(results: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path:
    """Acc_r / Acc_f / Acc_o after each task, one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results)
    fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 3.2), squeeze=False,
                             sharey=True)
    for ax, method in zip(axes[0], methods, strict=True):
        rows = results[method]
        tasks = [r["task"] for r in rows]
        for key, label, style in (("acc_r", "Acc_r (remaining)", "o-"),
                                  ("acc_f", "Acc_f (this task)", "s-"),
                                  ("acc_o", "Acc_o (earlier tasks)", "^-")):
            pts = [(t, r[key]) for t, r in zip(tasks, rows, strict=True) if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=label)
        pre = [(t, r["acc_r_pretrained"]) for t, r in zip(tasks, rows, strict=True)]
        ax.plot(*zip(*pre, strict=True), "k:", label="pre-trained on remaining")
        ax.set_title(method)
        ax.set_xlabel("task")
        ax.set_xticks(tasks)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="center right")
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
    return path


def plot_group_norms(rows: Sequence[Mapping[str, Any]], path: Path, title: str = "GS-LoRA") -> Path:
    """Heatmap of group norms ‖θ_g‖ (rows: groups, columns: tasks) before each merge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = rows[0]["group_names"]
    data = np.array([r["group_norms"] for r in rows], dtype=float).T  # [groups, tasks]
    masked = np.ma.masked_where(data == 0.0, data)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * data.shape[1], 0.9 + 0.45 * data.shape[0]))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")  # zero groups: white
    im = ax.imshow(masked, aspect="auto", cmap=cmap)
    for (g, t), v in np.ndenumerate(data):
        ax.text(t, g, "0" if v == 0 else f"{v:.2g}", ha="center", va="center", fontsize=7,
                color="black" if v == 0 else "white")
    ax.set_yticks(range(len(names)), names)
    ax.set_xticks(range(data.shape[1]), [f"task {r['task']}" for r in rows])
    zero = int((data == 0).sum())
    ax.set_title(f"{title}: group norms (white = exactly 0: {zero}/{data.size})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
    return path


def write_report(out_dir: str | Path, results: Mapping[str, Sequence[Mapping[str, Any]]],
                 meta: Mapping[str, Any], plots: bool = True) -> dict[str, Path]:
    """Write ``metrics.json``, ``table.txt`` and the plots into ``out_dir`` (atomically each)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results, meta.get("pretrained_test_acc"))
    paths = {"metrics": out / "metrics.json", "table": out / "table.txt"}
    _write_json(paths["metrics"], {"meta": dict(meta), "results": {k: list(v) for k, v in results.items()},
                                   "summary": {k: summary_rows(v) for k, v in results.items()}})

    def write_table(tmp: str) -> None:
        Path(tmp).write_text(table + "\n")
    _atomic_write(paths["table"], write_table)
    if plots and results:
        paths["accuracies"] = plot_accuracies(results, out / "accuracies.png")
        for method, rows in results.items():
            if rows and rows[0].get("group_norms") is not None and method == "gslora":
                paths["group_norms"] = plot_group_norms(rows, out / "group_norms.png")
    return paths


def load_metrics(path: str | Path) -> dict[str, Any]:
    """Read a ``metrics.json`` written by :func:`write_report`."""
    return json.loads(Path(path).read_text())
