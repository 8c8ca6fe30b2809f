"""One trial, end to end and without Ray Tune: data -> model -> fit -> cost -> result dict.

This is what `malloc-ray train` prints and what a Tune trial reports; the Tune trainable is a
thin wrapper around `run_trial`.
"""

from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch

from malloc_ray.config import TrialConfig, config_hash
from malloc_ray.data import loader
from malloc_ray.errors import InputError
from malloc_ray.metrics.cost import cost_summary
from malloc_ray.model.ctr import CTRModel
from malloc_ray.model.hstu import HSTUConfig
from malloc_ray.train.loop import TrainConfig, fit


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA was requested but torch sees no GPU; use --device cpu",
                         key="device")
    return torch.device(name)


def build_model(cfg: TrialConfig, vocab_size: int) -> CTRModel:
    hstu = HSTUConfig(d_model=cfg.d_model, num_heads=cfg.num_heads, num_layers=cfg.depth,
                      max_len=cfg.max_len, dropout=cfg.dropout)
    return CTRModel(hstu, cfg.method, vocab_size, cfg.hparams, cfg.loss_positions)


def batch_factories(cfg: TrialConfig, ds, samples: dict | None = None):
    """(train(epoch), valid(), test()) batch iterables from the configured loader.

    `samples` maps a split to a materialized Ray dataset of its (user, prefix_len) rows (the
    study driver prepares them once); without it each split is selected from `ds`."""
    def make(split: str, shuffle: bool, seed: int):
        size = cfg.batch_size if split == "train" else cfg.eval_batch_size
        kwargs = dict(split=split, batch_size=size, max_len=cfg.max_len,
                      loss_positions=cfg.loss_positions, shuffle=shuffle, seed=seed)
        if cfg.loader == "ray":
            return loader.ray_batches(ds, samples=(samples or {}).get(split), **kwargs)
        return loader.local_batches(ds, **kwargs)

    return (lambda epoch: make("train", True, cfg.seed * 1000 + epoch),
            lambda: make("valid", False, 0),
            lambda: make("test", False, 0))


def train_config(cfg: TrialConfig) -> TrainConfig:
    return TrainConfig(lr=cfg.lr, epochs=cfg.epochs, patience=cfg.patience,
                       grad_clip=cfg.grad_clip, explode_grad_norm=cfg.explode_grad_norm,
                       no_learning_epochs=cfg.no_learning_epochs,
                       max_steps_per_epoch=cfg.max_steps_per_epoch,
                       weight_decay=cfg.weight_decay, seed=cfg.seed)


def run_trial(cfg: TrialConfig, on_epoch: Callable[[dict], None] | None = None,
              samples: dict | None = None) -> dict:
    """Train and evaluate one (dataset, method, depth, seed) cell; never raises for a model
    that diverges (status says so). `samples`: see `batch_factories`."""
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    ds = loader.load_dataset(cfg.dataset)
    model = build_model(cfg, ds.meta["vocab_size"]).to(device)
    if model.method.workflow == "post-hoc":
        raise InputError(f"method '{cfg.method}' is post-hoc: it is applied to a trained "
                         "native model, not trained itself", key="method")
    train, valid, test = batch_factories(cfg, ds, samples)
    result = fit(model, train, valid, test, train_config(cfg), device=device, on_epoch=on_epoch)
    model.to("cpu")
    return {
        **result,
        **cost_summary(model, n_history=cfg.max_len - 1),
        "method": cfg.method, "category": model.method.category,
        "workflow": model.method.workflow, "depth": cfg.depth, "seed": cfg.seed,
        "dataset_id": ds.meta["dataset_id"], "config_hash": config_hash(cfg, ds.meta["dataset_id"]),
    }
