"""Plain-PyTorch training loop: Adam, gradient clipping, early stopping on validation AUC, failure guard.

No Ray here; `train.trainable` wraps `fit` for Tune and reports through `on_epoch`.

Model contract: `model.loss(batch)` returns a scalar training loss (train mode) and
`model.predict(batch)` the click probability at the target, shape (B,) (eval mode, no grad). A batch is a
dict of tensors: `items`, `labels` (B, S) left padded with the target in the last column, `lengths` (B,),
`user` (B,).

Epochs are numbered from 0, the same index `train_batches(epoch)` receives.

Failures are results, not exceptions: a non-finite loss, or a pre-clip gradient norm that is
non-finite or above `explode_grad_norm`, or non-finite validation predictions end the run with
`status="diverged"`. A model that did not learn is a status too, on by default: a best validation AUC
below 0.5 + `no_learning_margin` (0.02) at the end makes the run `status="no_learning"` (its metrics are
kept, but it is never ranked), and with `no_learning_epochs` > 0 the run already stops there after that
many epochs. A diverged run reports sentinel metrics that are finite and rank below any
trained model: AUC = GAUC = 0.5 (chance) and Logloss = -log(1e-7) ≈ 16.1, the worst value the clipped
Logloss can take. History keeps what was observed before the failure.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from malloc_ray.config import NO_LEARNING_MARGIN
from malloc_ray.metrics.ranking import ranking_metrics

LOGLOSS_EPS = 1e-7
DIVERGED_METRICS = {"auc": 0.5, "gauc": 0.5, "logloss": -math.log(LOGLOSS_EPS)}


def learned(best_valid_auc: float, margin: float | None = NO_LEARNING_MARGIN) -> bool:
    """Whether a best validation AUC shows the model learned (NaN: it cannot show it).
    `margin` None turns the check off (always True)."""
    if margin is None:
        return True
    return best_valid_auc == best_valid_auc and best_valid_auc >= 0.5 + margin


@dataclass
class TrainConfig:
    lr: float = 5e-4
    epochs: int = 20
    patience: int = 3                # epochs without a better valid AUC before stopping
    grad_clip: float = 1.0           # max total grad norm; 0 disables clipping (the norm is still checked)
    explode_grad_norm: float = 1e4   # pre-clip total grad norm above this (or non-finite) -> diverged
    no_learning_epochs: int = 0      # >0: stop as no_learning after this many epochs without learning
    no_learning_margin: float | None = NO_LEARNING_MARGIN  # valid AUC < 0.5 + this: no_learning
    max_steps_per_epoch: int | None = None
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self):
        # patience 0 would stop after the first epoch whatever happens.
        if self.epochs < 1 or self.patience < 1:
            raise ValueError(f"epochs and patience must be >= 1, got {self.epochs} and {self.patience}")


class _Diverged(Exception):
    """Internal signal from a training step; `fit` turns it into a result."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def _cpu_state(model: torch.nn.Module) -> dict:
    # A CPU copy survives later optimizer steps and does not hold accelerator memory.
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def evaluate(model: torch.nn.Module, batches: Iterable[dict], device="cpu") -> dict:
    """AUC, GAUC (grouped by `batch["user"]`), Logloss and sample count `n` at the target position,
    plus `finite`: whether every prediction was a number."""
    model.eval()
    probs, labels, users = [], [], []
    with torch.no_grad():
        for batch in batches:
            batch = _to_device(batch, device)
            probs.append(model.predict(batch).reshape(-1).float().cpu())
            labels.append(batch["labels"][:, -1].cpu())
            users.append(batch["user"].cpu())
    if not probs:
        return {"auc": math.nan, "gauc": math.nan, "logloss": math.nan, "finite": True, "n": 0}
    p, y, u = (torch.cat(x).numpy() for x in (probs, labels, users))
    metrics = ranking_metrics(y, p, u)
    # NaN predictions are a model failure that the rank metrics alone would not show.
    metrics["finite"] = bool(np.isfinite(p).all())
    metrics["n"] = int(y.size)
    return metrics


def _train_epoch(model, optimizer, batches: Iterable[dict], cfg: TrainConfig, device) -> tuple[float, int]:
    """One pass; returns (mean step loss, samples). Raises _Diverged before a bad update is applied."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    total_loss, steps, samples = 0.0, 0, 0
    for batch in batches:
        if cfg.max_steps_per_epoch is not None and steps >= cfg.max_steps_per_epoch:
            break
        batch = _to_device(batch, device)
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(batch)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        # One host sync per step for both checks.
        loss_value, norm_value = torch.stack([loss.detach().float(), norm.float()]).tolist()
        if not math.isfinite(loss_value):
            raise _Diverged("non-finite loss")
        if not math.isfinite(norm_value) or norm_value > cfg.explode_grad_norm:
            raise _Diverged(f"gradient norm {norm_value:.3g}")
        optimizer.step()
        total_loss += loss_value
        steps += 1
        samples += batch["labels"].shape[0]
    return (total_loss / steps if steps else math.nan), samples


def _result(status, failed_epoch, reason, best_epoch, history, metrics, valid_auc, train_seconds,
            samples) -> dict:
    return {
        "status": status, "failed_epoch": failed_epoch, "reason": reason,
        "best_epoch": best_epoch, "epochs_run": len(history),
        "auc": metrics["auc"], "gauc": metrics["gauc"], "logloss": metrics["logloss"],
        "valid_auc": valid_auc, "history": history, "train_seconds": train_seconds,
        "samples_per_second": samples / train_seconds if train_seconds > 0 else 0.0,
    }


def fit(model: torch.nn.Module, train_batches: Callable[[int], Iterable[dict]],
        valid_batches: Callable[[], Iterable[dict]], test_batches: Callable[[], Iterable[dict]],
        cfg: TrainConfig, device="cpu", on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train with early stopping on valid AUC, restore the best epoch, evaluate test there.

    Seeds torch with `cfg.seed` (the caller seeds model initialisation before building the model).
    `train_seconds` counts training steps only; each history record's `seconds` is the whole epoch,
    validation included. Whatever the status, the model ends holding the best epoch's weights.
    """
    torch.manual_seed(cfg.seed)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: list[dict] = []
    best_epoch, best_score, best_state = None, -math.inf, None
    train_seconds, samples = 0.0, 0
    status, failed_epoch, reason = "ok", None, None

    for epoch in range(cfg.epochs):
        start = time.perf_counter()
        try:
            train_loss, n = _train_epoch(model, optimizer, train_batches(epoch), cfg, device)
        except _Diverged as failure:
            status, failed_epoch, reason = "diverged", epoch, failure.reason
            break
        finally:
            train_seconds += time.perf_counter() - start
        samples += n
        valid = evaluate(model, valid_batches(), device)
        if not valid["finite"]:
            status, failed_epoch, reason = "diverged", epoch, "non-finite validation predictions"
            break
        record = {"epoch": epoch, "train_loss": train_loss, "valid_auc": valid["auc"],
                  "valid_gauc": valid["gauc"], "valid_logloss": valid["logloss"],
                  "seconds": time.perf_counter() - start}
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        # A nan AUC (single-class valid split) ranks below any number but still yields a best epoch.
        score = -math.inf if math.isnan(valid["auc"]) else valid["auc"]
        if best_epoch is None or score > best_score:
            best_epoch, best_score, best_state = epoch, score, _cpu_state(model)
        if cfg.no_learning_epochs and epoch + 1 == cfg.no_learning_epochs \
                and not learned(best_score, cfg.no_learning_margin):
            status, failed_epoch, reason = "no_learning", epoch, f"best valid AUC {best_score:.4f}"
            break
        if epoch - best_epoch >= cfg.patience:
            break

    if status == "ok" and not learned(best_score, cfg.no_learning_margin):
        status, failed_epoch = "no_learning", len(history) - 1
        reason = f"best valid AUC {best_score:.4f} < 0.5 + {cfg.no_learning_margin}"
    if best_state is not None:
        model.load_state_dict(best_state)
    if status == "diverged":
        metrics, valid_auc = DIVERGED_METRICS, DIVERGED_METRICS["auc"]
    else:
        metrics, valid_auc = evaluate(model, test_batches(), device), history[best_epoch]["valid_auc"]
    return _result(status, failed_epoch, reason, best_epoch, history, metrics, valid_auc,
                   train_seconds, samples)
