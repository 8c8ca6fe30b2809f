"""One trial, end to end and without Ray Tune: data -> model -> fit -> cost -> result dict.

This is what `malloc-ray train` prints and what a Tune trial reports; the Tune trainable is a
thin wrapper around `run_trial`.
"""

from __future__ import annotations

import random
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from malloc_ray.config import TrialConfig, config_hash
from malloc_ray.data import loader, streams
from malloc_ray.errors import InputError
from malloc_ray.methods import get_method
from malloc_ray.metrics.cost import cost_summary
from malloc_ray.model.ctr import CTRModel
from malloc_ray.train.loop import NO_LEARNING_MARGIN, evaluate, fit, learned


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA was requested but torch sees no GPU; use --device cpu",
                         key="device")
    return torch.device(name)


def build_model(cfg: TrialConfig, ds) -> CTRModel:
    """The trial's model for prepared dataset `ds` (its vocabulary, its loss positions)."""
    return CTRModel(cfg.model_config(), get_method(cfg.method), ds.meta["vocab_size"],
                    cfg.hparams, loader.resolve_loss_positions(ds, cfg.loss_positions))


def batch_factories(cfg: TrialConfig, ds, samples: dict | None = None):
    """(train(epoch), valid(), test()) batch iterables from the configured loader.

    `samples` maps a split to a materialized Ray dataset of its (user, prefix_len) rows (the
    study driver prepares them once); without it each split is selected from `ds`."""
    def make(split: str, shuffle: bool, seed: int):
        size = cfg.batch_size if split == "train" else cfg.eval_batch_size
        if split != "train" and cfg.eval_protocol == "stream":  # one row per user
            return streams.stream_batches(ds, split, cfg.max_len, size)
        kwargs = dict(split=split, batch_size=size, max_len=cfg.max_len,
                      loss_positions=cfg.loss_positions, shuffle=shuffle, seed=seed,
                      negatives=cfg.train_negatives if split == "train" else "fixed")
        if cfg.loader == "ray":
            return loader.ray_batches(ds, samples=(samples or {}).get(split), **kwargs)
        return loader.local_batches(ds, packed=split != "train", **kwargs)

    def train(epoch: int):
        batches = make("train", True, cfg.seed * 1000 + epoch)
        return inject_fault(cfg.fault, epoch, batches) if cfg.fault else batches

    return train, lambda: make("valid", False, 0), lambda: make("test", False, 0)


def inject_fault(fault: str, epoch: int, batches):
    """The `fault` testing aid: poison the batches of the given epoch onwards."""
    kind, _, at = fault.partition(":")
    if epoch < int(at):
        yield from batches
        return
    if kind == "raise":
        raise RuntimeError(f"injected fault at epoch {epoch}")
    for batch in batches:  # nan: an item embedding index that yields NaN would be intrusive;
        yield {**batch, "nan_loss": True}  # the model multiplies its loss by NaN instead


def run_trial(cfg: TrialConfig, on_epoch: Callable[[dict], None] | None = None,
              samples: dict | None = None, save_checkpoint: str | Path | None = None,
              native_checkpoint: str | Path | None = None) -> dict:
    """Train and evaluate one (dataset, method, depth, seed) cell; never raises for a model
    that diverges (status says so). `samples`: see `batch_factories`.

    A post-hoc method is not trained: it loads `native_checkpoint` (the trained Native model
    of the same dataset, depth and seed) and is only evaluated. `save_checkpoint` writes the
    trained weights for such later use."""
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    ds = loader.load_dataset(cfg.dataset)
    if cfg.eval_protocol == "stream":
        streams.user_streams(ds, "valid", cfg.max_len)  # refuses what it cannot replay, now
    model = build_model(cfg, ds).to(device)
    train, valid, test = batch_factories(cfg, ds, samples)
    if model.method.workflow == "post-hoc":
        if native_checkpoint is None:
            raise InputError(f"method '{cfg.method}' is post-hoc: it needs the trained native "
                             "model of the same dataset, depth and seed", key="method")
        result = evaluate_post_hoc(model, native_checkpoint, valid, test, device,
                                   cfg.no_learning_margin)
    else:
        result = fit_blaming_epoch(model, (train, valid, test), cfg, device, on_epoch)
    model.to("cpu")
    if save_checkpoint is not None:
        save_weights(model, save_checkpoint)
    return {
        **result,
        **cost_summary(model, n_history=cfg.max_len - 1),
        "method": cfg.method, "category": model.method.category,
        "workflow": model.method.workflow, "depth": cfg.depth, "seed": cfg.seed,
        "dataset_id": ds.meta["dataset_id"], "config_hash": config_hash(cfg, ds.meta["dataset_id"]),
    }


def fit_blaming_epoch(model: CTRModel, batches: tuple, cfg: TrialConfig, device,
                      on_epoch: Callable[[dict], None] | None) -> dict:
    """`fit`; an exception it raises gets `failed_epoch`, the epoch that was running (None
    before the first), which the study records: on_epoch only knows the last one finished."""
    train, valid, test = batches
    started: list[int] = []

    def tracked(epoch: int):
        started.append(epoch)
        return train(epoch)

    try:
        return fit(model, tracked, valid, test, cfg.train_config(), device=device,
                   on_epoch=on_epoch)
    except Exception as exc:
        exc.failed_epoch = started[-1] if started else None
        raise


def save_weights(model: CTRModel, path: str | Path) -> None:
    """Atomic write, so a killed trial never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)


def evaluate_post_hoc(model: CTRModel, checkpoint: str | Path, valid, test, device,
                      margin: float = NO_LEARNING_MARGIN) -> dict:
    """Load Native's weights unchanged (strict: same parameters) and evaluate; no gradient.
    Like a trained run, one whose validation AUC shows nothing learned is `no_learning`."""
    state = torch.load(checkpoint, map_location=device, weights_only=True)
    model.load_state_dict(state, strict=True)
    start = time.perf_counter()
    valid_metrics, test_metrics = evaluate(model, valid(), device), evaluate(model, test(), device)
    ok = learned(valid_metrics["auc"], margin)
    return {"status": "ok" if ok else "no_learning", "failed_epoch": None,
            "reason": None if ok else f"valid AUC {valid_metrics['auc']:.4f} < 0.5 + {margin}",
            "best_epoch": None,
            "epochs_run": 0, "auc": test_metrics["auc"], "gauc": test_metrics["gauc"],
            "logloss": test_metrics["logloss"], "valid_auc": valid_metrics["auc"],
            "history": [], "train_seconds": 0.0, "samples_per_second": None,
            "eval_seconds": time.perf_counter() - start}
