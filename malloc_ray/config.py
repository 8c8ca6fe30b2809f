"""Trial configuration: one dataclass, YAML/dict in, unknown keys rejected, a stable hash.

The trial id is the hash of the resolved config with the dataset *id* (content hash) in place
of its path, so the same experiment on a moved copy of the data has the same id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from malloc_ray.errors import InputError

DEVICES = ("cpu", "cuda")
LOADERS = ("local", "ray")
# Train on every item of a window, or on its target only; "auto": "all" unless the dataset
# scores explicit candidates (its histories hold interactions only, so only the target can be
# a negative), then "last" -- resolved per dataset by `loader.resolve_loss_positions`.
LOSS_POSITIONS = ("auto", "all", "last")
# The training split's candidate-only negatives: kept as prepared, or redrawn every pass with
# the sampler that drew them; "auto": "fresh" where the dataset says its negatives were drawn
# (meta "negatives": "uniform"), else "fixed" -- resolved by `loader.resolve_train_negatives`.
TRAIN_NEGATIVES = ("auto", "fixed", "fresh")
EVAL_PROTOCOLS = ("window", "stream")  # a fresh window per target, or serving replay per user


# On CPU an evaluation batch is sized by its (B, heads, 2L, 2L) attention score buffer: past
# about 16 MiB it leaves the caches and every sample gets slower, below a few samples per batch
# the per-batch overhead dominates (benchmarks/eval_batch.py, docs/benchmarks.md).
CPU_EVAL_SCORE_BYTES = 16 * 2**20
# A best validation AUC below 0.5 + this: the model learned nothing (status no_learning).
NO_LEARNING_MARGIN = 0.02
CPU_EVAL_BATCH_RANGE = (4, 64)
CUDA_EVAL_BATCH = 256


# Fields with a fixed set of values (the CLI offers them as choices).
CHOICES = {"device": DEVICES, "loader": LOADERS, "loss_positions": LOSS_POSITIONS,
           "train_negatives": TRAIN_NEGATIVES, "eval_protocol": EVAL_PROTOCOLS}
# One line of help per field, where the name alone does not say it (the CLI shows them).
FIELD_HELP = {
    "dataset": "prepared dataset directory (malloc-ray data prepare)",
    "method": "memory method (malloc-ray methods lists them)",
    "depth": "HSTU layers",
    "max_len": "interactions per window, target included",
    "silu_qkv": "SiLU on u, q, k, v (ArkHSTU) or on u only",
    "label_carries_item": "label token = label + item embedding (docs/model.md)",
    "loss_positions": "train on every item of a window or on its target only (auto: all, or last "
                      "where the dataset scores candidates)",
    "train_negatives": "training negatives as prepared (fixed) or redrawn every pass (fresh; "
                       "auto: fresh where the dataset drew them itself)",
    "eval_batch_size": "evaluation windows per batch at full length; shorter windows are "
                       "packed more densely in the same memory (default: sized for the "
                       "device)",
    "weight_decay": "AdamW decay of weight matrices (not embeddings, biases, norms)",
    "embedding_l2": "L2 on the embedding rows a batch touches, per sample",
    "warmup_steps": "linear learning-rate warm-up over this many steps",
    "lr_plateau_factor": "multiply the learning rate by this after an evaluation without "
                         "improvement (1: never)",
    "eval_every_steps": "also validate every N training steps (null: off)",
    "eval_every_targets": "also validate every N trained targets, i.e. loss positions "
                          "(null: off; with neither, after each pass only)",
    "max_valid_drop": "stop once validation AUC falls this far below its best (null: "
                      "patience only)",
    "epochs": "passes over the training split",
    "patience": "evaluations without a better validation AUC before stopping",
    "no_learning_epochs": "stop as no_learning after this many evaluations without learning",
    "no_learning_margin": "best validation AUC below 0.5 + this: status no_learning",
    "max_steps_per_epoch": "cap on training steps per pass",
    "loader": "batches from in-process numpy (local) or Ray Data (ray)",
    "eval_protocol": "window: a fresh window per target; stream: per user prefill once, "
                     "then score and append each target (docs/training.md)",
}


def default_eval_batch_size(device: str, num_heads: int, max_len: int) -> int:
    """Evaluation batch size when the config leaves it unset (results do not depend on it)."""
    if device == "cuda":
        return CUDA_EVAL_BATCH
    score_bytes = 4 * num_heads * (2 * max_len) ** 2  # one sample's fp32 scores, one layer
    low, high = CPU_EVAL_BATCH_RANGE
    return max(low, min(high, CPU_EVAL_SCORE_BYTES // score_bytes))


@dataclass
class TrainConfig:
    """What the training loop (train/loop.py `fit`) needs; built by `TrialConfig.train_config`.
    Users set these through the trial config, which validates them; the trial config takes
    its defaults from here. The defaults are the backbone recipe (docs/training.md), chosen on
    ML-100K, Amazon Toys and the synthetic profiles together, not per dataset."""

    lr: float = 1e-3
    epochs: int = 20                 # passes over the training split
    patience: int = 3                # evaluations without a better valid AUC before stopping
    grad_clip: float = 1.0           # max total grad norm; 0 disables clipping (the norm is still checked)
    explode_grad_norm: float = 1e4   # pre-clip total grad norm above this (or non-finite) -> diverged
    no_learning_epochs: int = 0      # >0: stop as no_learning after this many evaluations without learning
    no_learning_margin: float | None = NO_LEARNING_MARGIN  # valid AUC < 0.5 + this: no_learning
    max_steps_per_epoch: int | None = None
    weight_decay: float = 0.05       # AdamW decay of weight matrices (not embeddings, biases, norms)
    embedding_l2: float = 1e-4       # L2 on the embedding rows a batch touches, per sample
    warmup_steps: int = 50           # linear learning-rate warm-up over this many steps
    lr_plateau_factor: float = 0.5   # lr *= this after an evaluation without improvement
    eval_every_steps: int | None = None  # also evaluate every N steps within a pass
    eval_every_targets: int | None = 32768  # ... and every N trained targets (loss positions)
    max_valid_drop: float | None = 0.01  # stop once valid AUC is this far below its best
    seed: int = 0

    def __post_init__(self):
        # The loop's own invariant (TrialConfig checks every user-facing value with its key):
        # patience 0 would stop after the first evaluation whatever happens.
        if self.epochs < 1 or self.patience < 1:
            raise ValueError(f"epochs and patience must be >= 1, got {self.epochs} and {self.patience}")


@dataclass
class TrialConfig:
    dataset: str                         # prepared dataset directory
    method: str = "native"
    depth: int = 2                       # HSTU layers
    seed: int = 0
    d_model: int = 64
    num_heads: int = 4
    max_len: int = 128                   # interactions per window, target included
    dropout: float = 0.3
    silu_qkv: bool = True            # SiLU on u,q,k,v (ArkHSTU) or on u only
    label_carries_item: bool = True  # label token = label + item embedding (docs/model.md)
    loss_positions: str = "auto"
    train_negatives: str = "auto"
    hparams: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    eval_batch_size: int | None = None  # None: sized for the device (default_eval_batch_size)
    eval_protocol: str = "window"
    # the training recipe: TrainConfig's defaults (one place)
    lr: float = TrainConfig.lr
    weight_decay: float = TrainConfig.weight_decay
    embedding_l2: float = TrainConfig.embedding_l2
    warmup_steps: int = TrainConfig.warmup_steps
    lr_plateau_factor: float = TrainConfig.lr_plateau_factor
    eval_every_steps: int | None = TrainConfig.eval_every_steps
    eval_every_targets: int | None = TrainConfig.eval_every_targets
    max_valid_drop: float | None = TrainConfig.max_valid_drop
    epochs: int = TrainConfig.epochs
    patience: int = TrainConfig.patience
    grad_clip: float = TrainConfig.grad_clip
    explode_grad_norm: float = TrainConfig.explode_grad_norm
    no_learning_epochs: int = TrainConfig.no_learning_epochs
    no_learning_margin: float | None = TrainConfig.no_learning_margin  # best valid AUC < 0.5 + this: no_learning
    max_steps_per_epoch: int | None = TrainConfig.max_steps_per_epoch
    device: str = "cpu"
    loader: str = "local"
    # Testing aid: "nan:K" makes the training loss NaN from epoch K on, "raise:K" raises in
    # epoch K. Used to check that failures end up as data, not as a crashed study.
    fault: str | None = None

    def __post_init__(self):
        if isinstance(self.dataset, os.PathLike):  # a Path from Python callers: stored as text
            self.dataset = os.fspath(self.dataset)
        _check_types(self)
        for key, (test, what) in RULES.items():
            value = getattr(self, key)
            if not test(value):
                raise InputError(f"must be {what}, got {value!r}", key=key)
        if self.eval_batch_size is None:
            self.eval_batch_size = default_eval_batch_size(self.device, self.num_heads, self.max_len)
        from malloc_ray.methods import get_method  # the registry; imported late, it is heavy

        get_method(self.method).parse_hparams(self.hparams)  # unknown method or key: an error

    def model_config(self):
        """The HSTU stack this trial trains (model/hstu.py)."""
        from malloc_ray.model.hstu import HSTUConfig

        return HSTUConfig(d_model=self.d_model, num_heads=self.num_heads, num_layers=self.depth,
                          max_len=self.max_len, dropout=self.dropout, silu_qkv=self.silu_qkv,
                          label_carries_item=self.label_carries_item)

    def train_config(self) -> TrainConfig:
        """What the training loop needs: every TrainConfig field is a trial field."""
        return TrainConfig(**{f.name: getattr(self, f.name)
                              for f in dataclasses.fields(TrainConfig)})

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrialConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in known:
                raise InputError(f"unknown trial config key; known: {', '.join(sorted(known))}",
                                 key=key)
        if "dataset" not in raw:
            raise InputError("required key is missing", key="dataset")
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields whose default is None take None or this type; every other field takes its default's.
OPTIONAL_TYPES = {"eval_batch_size": int, "max_steps_per_epoch": int, "fault": str,
                  "eval_every_steps": int, "eval_every_targets": int,
                  "no_learning_margin": float, "max_valid_drop": float}
# Fields with a default that also take None (meaning: off).
NULLABLE = ("no_learning_margin", "eval_every_steps", "eval_every_targets", "max_valid_drop")
TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
              dict: "a mapping"}


def _positive(v) -> bool:
    return v >= 1


def _fault(v) -> bool:
    kind, _, epoch = str(v).partition(":")
    return kind in ("nan", "raise") and epoch.isdigit()


# The one check of every trial value beyond its type (_check_types), with the words an error
# uses. Optional fields (default None) are checked only when set.
RULES: dict[str, tuple[Any, str]] = {
    "device": (lambda v: v in DEVICES, f"one of {DEVICES}"),
    "loader": (lambda v: v in LOADERS, f"one of {LOADERS}"),
    "loss_positions": (lambda v: v in LOSS_POSITIONS, f"one of {LOSS_POSITIONS}"),
    "train_negatives": (lambda v: v in TRAIN_NEGATIVES, f"one of {TRAIN_NEGATIVES}"),
    "eval_protocol": (lambda v: v in EVAL_PROTOCOLS, f"one of {EVAL_PROTOCOLS}"),
    # patience 0 would end every trial after its first evaluation
    **{k: (_positive, "a positive integer") for k in
       ("depth", "d_model", "num_heads", "batch_size", "epochs", "patience")},
    "max_len": (lambda v: v >= 2, ">= 2 (one history interaction plus the target)"),
    **{k: (lambda v: v >= 0, ">= 0") for k in  # numpy refuses negative seeds
       ("seed", "no_learning_epochs", "warmup_steps", "weight_decay", "embedding_l2",
        "grad_clip")},
    **{k: (lambda v: v is None or v >= 1, "a positive integer or null") for k in
       ("max_steps_per_epoch", "eval_batch_size", "eval_every_steps", "eval_every_targets")},
    "dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "lr": (lambda v: v > 0, "> 0"),
    "lr_plateau_factor": (lambda v: 0 < v <= 1, "a number in (0, 1] (1: no decay)"),
    "explode_grad_norm": (lambda v: v > 0, "> 0"),
    "fault": (lambda v: v is None or _fault(v), "'nan:EPOCH' or 'raise:EPOCH'"),
    "no_learning_margin": (lambda v: v is None or 0 <= v < 0.5,
                           "a number in [0, 0.5) or null (off)"),
    "max_valid_drop": (lambda v: v is None or 0 < v < 1, "a number in (0, 1) or null (off)"),
}


def has_type(value: Any, kind: type) -> bool:
    if kind in (int, float) and isinstance(value, bool):  # YAML true is no number
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def _check_types(cfg: TrialConfig) -> None:
    """Every field holds its default's type, so a bad YAML value fails here, naming its key,
    and not as a TypeError deep in training."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.default is None or f.name in NULLABLE:
            kind = None if value is None else OPTIONAL_TYPES.get(f.name, object)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kind = str  # the dataset path
        else:
            kind = type(f.default_factory() if f.default is dataclasses.MISSING else f.default)
        if kind is not None and not has_type(value, kind):
            raise InputError(f"must be {TYPE_WORDS.get(kind, kind.__name__)}, got {value!r}",
                             key=f.name)


def config_hash(cfg: TrialConfig, dataset_id: str) -> str:
    """Stable id of a trial: everything that changes its result, nothing that does not."""
    resolved = cfg.to_dict()
    resolved["dataset"] = dataset_id
    # Where it runs and how evaluation is batched do not change what it computes.
    for key in ("device", "loader", "eval_batch_size"):
        resolved.pop(key)
    blob = json.dumps(resolved, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def baseline_hash(name: str, dataset_id: str, max_len: int, **options) -> str:
    """Stable id of a study's baseline cell (`study.run.run_baselines`): the baseline, the
    dataset's content id and the history window, plus what else changes its scores (`options`,
    e.g. a peer's batch size). A prefix keeps it apart from every `config_hash`."""
    resolved = {"baseline": name, "dataset": dataset_id, "max_len": int(max_len), **options}
    blob = json.dumps(resolved, sort_keys=True, default=str).encode()
    return hashlib.sha256(b"baseline:" + blob).hexdigest()[:16]
