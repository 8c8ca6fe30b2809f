"""The report's figures (PNG): the paper's Figure 4 (GAUC vs MACs, bubble = bytes) and Figure 5
(GAUC and Logloss vs depth), GAUC vs bytes fronts, and convergence curves per method.

Every function takes the Pareto summary (seed means per dataset × method × depth, see
`study.pareto`) or the trials table and returns what it marked, so tests can check that failed
cells are shown rather than dropped.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from malloc_ray.study.curves import draw_curves, pyplot
from malloc_ray.study.results import history

FAILED_COLOR = "#d62728"
# Axis names that say what is counted: bytes are the total a server keeps per user.
AXIS_LABELS = {"macs_per_request": "MACs per request",
               "kv_bytes_per_user": "bytes per user (payload + metadata)"}


def _colors(methods: list[str]) -> dict[str, tuple]:
    plt = pyplot()
    # tab20 holds 10 dark/light pairs; take the dark ones first so neighbours stay distinct.
    cmap = plt.get_cmap("tab20")
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    return {m: cmap(order[i % 20]) for i, m in enumerate(sorted(methods))}


def _panels(n: int, width: float = 6.0, height: float = 4.6):
    plt = pyplot()
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, list(axes[0])


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    pyplot().close(fig)
    return path


def _front_line(ax, points: pd.DataFrame, x: str) -> None:
    """Connect a 2-D front (GAUC ↑, x ↓) as a staircase, sorted by cost."""
    pts = points.sort_values(x)
    ax.step(pts[x], pts["gauc"], where="post", color="black", lw=1.2, alpha=0.7, zorder=1,
            label="Pareto front")


def tradeoff(summary: pd.DataFrame, path: Path, x: str = "macs_per_request",
             front: str = "front_gauc_macs", bubbles: bool = True) -> Path:
    """GAUC vs cost per dataset; each point is a (method, depth) seed mean with its 95% CI as
    error bar (none with one seed) and its seed count in the label.
    Dominated points are drawn faded, the front is connected. Bubble area ∝ bytes per user,
    payload + metadata (recompute methods, which keep no bytes, get the smallest bubble)."""
    datasets = sorted(summary["dataset"].unique())
    fig, axes = _panels(len(datasets))
    colors = _colors(list(summary["label"].unique()))
    max_bytes = max(float(summary["kv_bytes_per_user"].max(skipna=True) or 0), 1.0)
    for ax, ds in zip(axes, datasets):
        part = summary[(summary["dataset"] == ds) & (summary["n_ok"] > 0)]
        part = part[part[x].notna() & part["gauc"].notna()]
        for _, r in part.iterrows():
            size = 30 + 900 * math.sqrt(float(r["kv_bytes_per_user"] or 0) / max_bytes) \
                if bubbles else 50
            on = bool(r[front])
            ci = 0.0 if pd.isna(r["gauc_ci95"]) else r["gauc_ci95"]
            ax.errorbar(r[x], r["gauc"], yerr=ci, fmt="none", ecolor=colors[r["label"]],
                        capsize=3, alpha=0.8 if on else 0.3, zorder=2)
            ax.scatter(r[x], r["gauc"], s=size, color=colors[r["label"]],
                       alpha=0.85 if on else 0.25, edgecolors="black" if on else "none",
                       zorder=3)
            ax.annotate(f"{r['label']} d{r['depth']} n={int(r['n_ok'])}", (r[x], r["gauc"]),
                        fontsize=7, xytext=(4, 4), textcoords="offset points")
        if part[front].any():
            _front_line(ax, part[part[front]], x)
        ax.set_xscale("symlog" if (part[x] <= 0).any() else "log")
        ax.set(title=ds, xlabel=AXIS_LABELS.get(x, x.replace("_", " ")) + " (log)",
               ylabel="test GAUC")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def depth_scaling(summary: pd.DataFrame, path: Path) -> tuple[Path, list[dict]]:
    """GAUC and Logloss vs depth per method (rows = datasets), 95% CI bars over ok seeds. A
    depth where any seed failed
    gets a red ✗ labelled with the status: at the mean when some seeds are ok, on the bottom
    edge when none is. Returns the marks."""
    plt = pyplot()
    datasets = sorted(summary["dataset"].unique())
    fig, axes = plt.subplots(len(datasets), 2, figsize=(12, 4.4 * len(datasets)), squeeze=False)
    colors = _colors(list(summary["label"].unique()))
    marks = []
    for row, ds in zip(axes, datasets):
        part = summary[summary["dataset"] == ds]
        for ax, metric in zip(row, ("gauc", "logloss")):
            for method, rows in part.groupby("label", sort=True):
                rows = rows.sort_values("depth")
                ok = rows[rows["n_ok"] > 0]
                ax.errorbar(ok["depth"], ok[metric], yerr=ok[f"{metric}_ci95"].fillna(0),
                            marker="o", ms=4, capsize=3, color=colors[method], label=method)
            bottom = ax.get_ylim()[0]
            for _, r in part[part["n_failed"] > 0].iterrows():
                y = r[metric] if r["n_ok"] > 0 and pd.notna(r[metric]) else bottom
                ax.plot([r["depth"]], [y], marker="X", ms=11, color=FAILED_COLOR,
                        mec="black", ls="none", clip_on=False, zorder=5)
                ax.annotate(r["failed_statuses"], (r["depth"], y), fontsize=7,
                            color=FAILED_COLOR, xytext=(5, -10), textcoords="offset points")
                if metric == "gauc":
                    marks.append({"dataset": ds, "method": r["label"], "depth": int(r["depth"]),
                                  "statuses": r["failed_statuses"], "n_failed": int(r["n_failed"]),
                                  "at_mean": bool(r["n_ok"] > 0)})
            ax.set_xscale("log", base=2)
            depths = sorted(int(d) for d in part["depth"].unique())
            ax.set_xticks(depths, [str(d) for d in depths])
            ax.minorticks_off()
            ax.set(title=f"{ds}: {metric.upper() if metric == 'gauc' else 'Logloss'} vs depth",
                   xlabel="depth (blocks)", ylabel=metric)
            ax.grid(alpha=0.3)
        row[0].plot([], [], marker="X", color=FAILED_COLOR, ls="none", label="failed seed(s)")
        row[0].legend(fontsize=7, ncol=2)
    return _save(fig, path), marks


def convergence(table: pd.DataFrame, dataset: str, path: Path) -> Path:
    """Per method (rows): valid AUC and losses per epoch for every depth, for the lowest seed
    with a recorded history; ★ marks the selected (best-valid) epoch."""
    plt = pyplot()
    part = table[table["dataset"] == dataset]
    methods = sorted(part["method"].unique())
    fig, axes = plt.subplots(len(methods), 2, figsize=(11, 2.6 * len(methods)), squeeze=False)
    for (ax_auc, ax_loss), method in zip(axes, methods):
        rows = part[part["method"] == method].sort_values(["depth", "seed"])
        drawn = set()
        for _, r in rows.iterrows():
            hist = history(r)
            if not hist or r["depth"] in drawn:
                continue
            drawn.add(r["depth"])
            best = None if pd.isna(r["best_epoch"]) else int(r["best_epoch"])
            draw_curves(ax_auc, ax_loss, hist, best, label=f"depth {r['depth']} seed {r['seed']}")
        if not drawn:
            ax_auc.text(0.5, 0.5, "no epochs recorded (post-hoc or failed before epoch 0)",
                        ha="center", va="center", transform=ax_auc.transAxes, fontsize=8)
        ax_auc.set(title=f"{method}: valid AUC (★ selected epoch)", xlabel="epoch")
        ax_loss.set(title=f"{method}: train loss (—), valid logloss (--)", xlabel="epoch")
        for ax in (ax_auc, ax_loss):
            ax.grid(alpha=0.3)
        if drawn:
            ax_auc.legend(fontsize=7)
    return _save(fig, path)

