"""Plain-PyTorch training loop: the CTR recipe, early stopping on validation AUC, failure guard.

The recipe (FuxiCTR-style CTR training, every knob a trial config field): AdamW with weight
decay on weight matrices, L2 on the embedding rows a batch touches, gradient clipping, a linear
learning-rate warm-up, the learning rate cut by `lr_plateau_factor` after every evaluation
without improvement, and validation after every `eval_every_targets` trained targets (loss
positions; or every `eval_every_steps` steps) as well as after each pass, so a model that
overfits within a pass is stopped at its best evaluation. Counting targets rather than steps
gives one cadence for dense and sparse data: a step of 64 windows trains ~4,000 targets on
ML-100K (a loss at every position) but 64 on Amazon Toys (one candidate per window). Training stops after
`patience` evaluations without a better validation AUC, or at once when one falls more than
`max_valid_drop` below the best of a model that has learned (overfitting on sparse data can
cost more in one evaluation than patience should wait out). Neither applies to evaluations that
end inside the `warmup_steps` warm-up, nor does `no_learning_epochs`: such an evaluation still
books the best weights and the plateau cut, but never stops the run and is not counted by
patience (validating every few steps, as long histories or dense data do, would otherwise end a
run before it reached its learning rate).

No Ray here; `study/trainable.py` wraps it for Tune and reports through `on_epoch`.

Model contract: `model.loss(batch)` returns a scalar training loss (train mode) and
`model.predict(batch)` the click probability at the target, shape (B,) (eval mode, no grad). A batch is a
dict of tensors: `items`, `labels` (B, S) left padded with the target in the last column, `lengths` (B,),
`user` (B,).

Passes over the training data are numbered from 0, the index `train_batches(epoch)` receives.

Failures are results, not exceptions: a non-finite loss, or a pre-clip gradient norm that is
non-finite or above `explode_grad_norm`, or non-finite validation predictions end the run with
`status="diverged"`. A model that did not learn is a status too, on by default: a best validation AUC
below 0.5 + `no_learning_margin` (0.02) at the end makes the run `status="no_learning"` (its metrics are
kept, but it is never ranked), and with `no_learning_epochs` > 0 the run already stops there after that
many evaluations. A diverged run reports sentinel metrics that are finite and rank below any
trained model: AUC = GAUC = 0.5 (chance) and Logloss = -log(1e-7) ≈ 16.1, the worst value the clipped
Logloss can take. History keeps what was observed before the failure.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable

import torch

from malloc_ray.config import NO_LEARNING_MARGIN, TrainConfig
from malloc_ray.metrics.ranking import ranking_metrics

LOGLOSS_EPS = 1e-7
DIVERGED_METRICS = {"auc": 0.5, "gauc": 0.5, "logloss": -math.log(LOGLOSS_EPS)}


def learned(best_valid_auc: float, margin: float | None = NO_LEARNING_MARGIN) -> bool:
    """Whether a best validation AUC shows the model learned (NaN: it cannot show it).
    `margin` None turns the check off (always True)."""
    if margin is None:
        return True
    return best_valid_auc == best_valid_auc and best_valid_auc >= 0.5 + margin


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
        for batch in batches:  # metrics are computed where the model ran (no copy to host)
            batch = _to_device(batch, device)
            probs.append(model.predict(batch).reshape(-1).double())
            # a stream batch (data/streams.py) scores several targets per user
            labels.append(batch.get("eval_labels", batch["labels"][:, -1]))
            users.append(batch.get("eval_users", batch["user"]))
    if not probs:
        return {"auc": math.nan, "gauc": math.nan, "logloss": math.nan, "finite": True, "n": 0}
    p, y, u = (torch.cat(x) for x in (probs, labels, users))
    metrics = ranking_metrics(y, p, u)
    # NaN predictions are a model failure that the rank metrics alone would not show.
    metrics["finite"] = bool(torch.isfinite(p).all())
    metrics["n"] = int(y.numel())
    return metrics


def optimizer_for(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on weight matrices only. Embedding rows get their own L2 on the
    rows a batch touches (EmbeddingL2): decaying the whole table every step would shrink the
    rows of items a batch never saw, which hurts sparse data most."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in embeddings else plain).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


class EmbeddingL2:
    """coefficient * sum of squared norms of the embedding rows looked up in a forward pass,
    per sample (FuxiCTR's embedding regularizer, restricted to the rows in use). Collected by
    forward hooks, so any model with nn.Embedding lookups gets it without knowing."""

    def __init__(self, model: torch.nn.Module, coefficient: float):
        self.coefficient, self.lookups = coefficient, []
        self.hooks = [m.register_forward_hook(self._record) for m in model.modules()
                      if isinstance(m, torch.nn.Embedding)] if coefficient > 0 else []

    def _record(self, module, inputs, output):
        if module.training:
            self.lookups.append((module.weight, inputs[0]))

    def penalty(self, batch_size: int) -> torch.Tensor | float:
        lookups, self.lookups = self.lookups, []
        if not lookups:
            return 0.0
        total = sum(w[ids.reshape(-1).unique()].pow(2).sum() for w, ids in lookups)
        return self.coefficient * total / batch_size

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


def _targets(model, batch) -> int:
    """Training targets (loss positions) of a batch: the model says, else one per sample."""
    count = getattr(model, "loss_targets", None)
    return int(count(batch)) if count else int(batch["labels"].shape[0])


def _train_steps(model, optimizer, schedule, reg: EmbeddingL2, batches, limit: int,
                 cfg: TrainConfig, device, target_limit: float = math.inf
                 ) -> tuple[float, int, int, bool]:
    """Up to `limit` steps (or until `target_limit` targets) from the iterator `batches`;
    returns (mean step loss, samples, steps, whether `batches` ran out). Raises _Diverged
    before a bad update is applied."""
    model.train()
    targets = 0
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    total_loss, steps, samples = 0.0, 0, 0
    for batch in batches:
        targets += _targets(model, batch)  # counted on the host batch: no device sync
        batch = _to_device(batch, device)
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(batch)
        (loss + reg.penalty(batch["labels"].shape[0])).backward()
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        # One host sync per step for both checks.
        loss_value, norm_value = torch.stack([loss.detach().float(), norm.float()]).tolist()
        if not math.isfinite(loss_value):
            raise _Diverged("non-finite loss")
        if not math.isfinite(norm_value) or norm_value > cfg.explode_grad_norm:
            raise _Diverged(f"gradient norm {norm_value:.3g}")
        optimizer.step()
        schedule.step()
        total_loss += loss_value
        steps += 1
        samples += batch["labels"].shape[0]
        if steps >= limit or targets >= target_limit:
            return total_loss / steps, samples, steps, False
    return (total_loss / steps if steps else math.nan), samples, steps, True


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
    """Train with early stopping on valid AUC, restore the best evaluation, evaluate test there.

    Validation runs at the end of every pass over the training data and, with
    `eval_every_targets` / `eval_every_steps`, also every that many trained targets / steps
    (whichever comes first): one history record per evaluation, numbered
    by `epoch` (= the pass when evaluation is once per pass; `pass` and `step` say where it
    happened). Patience, `no_learning_epochs` and `best_epoch` count evaluations (patience only
    those after the warm-up).

    Seeds torch with `cfg.seed` (the caller seeds model initialisation before building the model).
    `train_seconds` counts training steps only; each history record's `seconds` is the whole
    chunk, validation included. Whatever the status, the model ends holding the best weights.
    """
    torch.manual_seed(cfg.seed)
    model.to(device)
    optimizer = optimizer_for(model, cfg)
    warmup, decay = max(cfg.warmup_steps, 1), [1.0]  # decay: the plateau factor so far
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: decay[0] * min(1.0, (step + 1) / warmup))
    reg = EmbeddingL2(model, cfg.embedding_l2)
    every = cfg.eval_every_steps or math.inf
    every_targets = cfg.eval_every_targets or math.inf
    per_pass = cfg.max_steps_per_epoch or math.inf
    history: list[dict] = []
    best_epoch, best_score, best_state = None, -math.inf, None
    last_warm = -1  # the last evaluation inside the learning-rate warm-up
    train_seconds, samples, step = 0.0, 0, 0
    status, failed_epoch, reason = "ok", None, None

    def judge(record: dict) -> bool:
        """Book one evaluation; True when training should stop."""
        nonlocal best_epoch, best_score, best_state, status, failed_epoch, reason, last_warm
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        index = record["epoch"]
        # A nan AUC (single-class valid split) ranks below any number but still yields a best.
        score = -math.inf if math.isnan(record["valid_auc"]) else record["valid_auc"]
        if best_epoch is None or score > best_score:
            best_epoch, best_score, best_state = index, score, _cpu_state(model)
        else:
            decay[0] *= cfg.lr_plateau_factor
        if record["step"] < cfg.warmup_steps:
            # A model still ramping up its learning rate is not judged: validating every few
            # steps (dense data, long histories) would otherwise spend the patience, or stop a
            # flat start as no_learning, before the recipe has reached its learning rate.
            last_warm = index
            return False
        if cfg.max_valid_drop is not None and score < best_score - cfg.max_valid_drop \
                and learned(best_score, cfg.no_learning_margin):
            # Overfitting shows: stop at once rather than wait out the patience. Only once the
            # model has learned something: before that, a dip is the noise of a flat start.
            return True
        if cfg.no_learning_epochs and index + 1 >= cfg.no_learning_epochs \
                and not learned(best_score, cfg.no_learning_margin):
            status, failed_epoch, reason = "no_learning", index, f"best valid AUC {best_score:.4f}"
            return True
        return index - max(best_epoch, last_warm) >= cfg.patience

    try:
        stop = False
        for epoch in range(cfg.epochs):
            batches, in_pass = iter(train_batches(epoch)), 0
            while not stop and in_pass < per_pass:
                start, limit = time.perf_counter(), min(every, per_pass - in_pass)
                try:
                    train_loss, n, steps, ran_out = _train_steps(
                        model, optimizer, schedule, reg, batches, limit, cfg, device,
                        every_targets)
                except _Diverged as failure:
                    status, failed_epoch, reason = "diverged", len(history), failure.reason
                    stop = True
                    break
                finally:
                    train_seconds += time.perf_counter() - start
                if steps == 0 and in_pass > 0:
                    break  # the pass ended exactly at an evaluation
                in_pass, step, samples = in_pass + steps, step + steps, samples + n
                valid = evaluate(model, valid_batches(), device)
                if not valid["finite"]:
                    status, failed_epoch = "diverged", len(history)
                    reason, stop = "non-finite validation predictions", True
                    break
                stop = judge({"epoch": len(history), "pass": epoch, "step": step,
                              "train_loss": train_loss, "valid_auc": valid["auc"],
                              "valid_gauc": valid["gauc"], "valid_logloss": valid["logloss"],
                              "lr": optimizer.param_groups[0]["lr"],
                              "seconds": time.perf_counter() - start})
                if ran_out:
                    break  # the pass is over
            if stop:
                break
    finally:
        reg.close()

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
