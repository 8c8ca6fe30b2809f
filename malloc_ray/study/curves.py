"""Convergence curves: validation AUC and losses per epoch, the selected epoch marked.

Used for the PNG on every MLflow child run and, per method, in the study report.
"""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib with a file-only backend: trials and reports run on machines with no screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_curves(ax_auc, ax_loss, history: list[dict], best_epoch=None, label=None,
                color=None) -> None:
    """Plot one run's records on two axes; the best (selected) epoch gets a star."""
    epochs = [r["epoch"] for r in history]
    auc = [r.get("valid_auc", float("nan")) for r in history]
    line, = ax_auc.plot(epochs, auc, marker="o", ms=3, label=label, color=color)
    color = line.get_color()
    ax_loss.plot(epochs, [r.get("train_loss", float("nan")) for r in history], color=color,
                 label=None if label is None else f"{label} train")
    ax_loss.plot(epochs, [r.get("valid_logloss", float("nan")) for r in history], color=color,
                 ls="--", label=None if label is None else f"{label} valid")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_auc, ax_loss):  # epochs are whole numbers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if best_epoch is not None and 0 <= best_epoch < len(history):
        ax_auc.plot([epochs[best_epoch]], [auc[best_epoch]], marker="*", ms=12, color=color,
                    mec="black", ls="none")


def plot_run_curves(history: list[dict], path: str | Path, best_epoch=None, title="") -> Path:
    plt = pyplot()
    fig, (ax_auc, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.4))
    draw_curves(ax_auc, ax_loss, history, best_epoch)
    ax_auc.set(xlabel="epoch", ylabel="valid AUC", title="validation AUC (★ selected epoch)")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="train loss (solid), valid logloss (dashed)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
