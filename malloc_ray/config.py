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


# On CPU an evaluation batch is sized by its (B, heads, 2L, 2L) attention score buffer: past
# about 16 MiB it leaves the caches and every sample gets slower, below a few samples per batch
# the per-batch overhead dominates (benchmarks/eval_batch.py, docs/benchmarks.md).
CPU_EVAL_SCORE_BYTES = 16 * 2**20
# A best validation AUC below 0.5 + this: the model learned nothing (status no_learning).
NO_LEARNING_MARGIN = 0.02
CPU_EVAL_BATCH_RANGE = (4, 64)
CUDA_EVAL_BATCH = 256


def default_eval_batch_size(device: str, num_heads: int, max_len: int) -> int:
    """Evaluation batch size when the config leaves it unset (results do not depend on it)."""
    if device == "cuda":
        return CUDA_EVAL_BATCH
    score_bytes = 4 * num_heads * (2 * max_len) ** 2  # one sample's fp32 scores, one layer
    low, high = CPU_EVAL_BATCH_RANGE
    return max(low, min(high, CPU_EVAL_SCORE_BYTES // score_bytes))


@dataclass
class TrialConfig:
    dataset: str                         # prepared dataset directory
    method: str = "native"
    depth: int = 2                       # HSTU layers
    seed: int = 0
    d_model: int = 64
    num_heads: int = 4
    max_len: int = 128                   # interactions per window, target included
    dropout: float = 0.1
    silu_qkv: bool = True            # SiLU on u,q,k,v (ArkHSTU) or on u only
    label_carries_item: bool = True  # label token = label + item embedding (docs/model.md)
    loss_positions: str = "all"
    hparams: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    eval_batch_size: int | None = None  # None: sized for the device (default_eval_batch_size)
    lr: float = 5e-4
    weight_decay: float = 0.0
    epochs: int = 20
    patience: int = 3
    grad_clip: float = 1.0
    explode_grad_norm: float = 1e4
    no_learning_epochs: int = 0
    no_learning_margin: float | None = NO_LEARNING_MARGIN  # best valid AUC < 0.5 + this: no_learning
    max_steps_per_epoch: int | None = None
    device: str = "cpu"
    loader: str = "local"
    # Testing aid: "nan:K" makes the training loss NaN from epoch K on, "raise:K" raises in
    # epoch K. Used to check that failures end up as data, not as a crashed study.
    fault: str | None = None

    def __post_init__(self):
        if isinstance(self.dataset, os.PathLike):  # a Path from Python callers: stored as text
            self.dataset = os.fspath(self.dataset)
        _check_types(self)
        if self.device not in DEVICES:
            raise InputError(f"must be one of {DEVICES}, got {self.device!r}", key="device")
        if self.loader not in LOADERS:
            raise InputError(f"must be one of {LOADERS}, got {self.loader!r}", key="loader")
        # patience 0 would end every trial after its first epoch (the loop refuses it)
        for key in ("depth", "d_model", "num_heads", "batch_size", "epochs", "max_len",
                    "patience"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise InputError(f"must be a positive integer, got {getattr(self, key)!r}", key=key)
        for key in ("seed", "no_learning_epochs"):  # numpy refuses negative seeds
            if getattr(self, key) < 0:
                raise InputError(f"must be >= 0, got {getattr(self, key)!r}", key=key)
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise InputError(f"must be a positive integer or null, got "
                             f"{self.max_steps_per_epoch!r}", key="max_steps_per_epoch")
        if self.max_len < 2:
            raise InputError("must be >= 2 (one history interaction plus the target)", key="max_len")
        if self.eval_batch_size is None:
            self.eval_batch_size = default_eval_batch_size(self.device, self.num_heads, self.max_len)
        if not isinstance(self.eval_batch_size, int) or self.eval_batch_size < 1:
            raise InputError(f"must be a positive integer or null, got {self.eval_batch_size!r}",
                             key="eval_batch_size")
        from malloc_ray.methods import get_method  # the registry; imported late, it is heavy

        get_method(self.method).parse_hparams(self.hparams)  # unknown method or key: an error
        if self.fault is not None:
            kind, _, epoch = str(self.fault).partition(":")
            if kind not in ("nan", "raise") or not epoch.isdigit():
                raise InputError(f"expected 'nan:EPOCH' or 'raise:EPOCH', got {self.fault!r}",
                                 key="fault")
        if not self.lr > 0:
            raise InputError(f"must be > 0, got {self.lr!r}", key="lr")
        margin = self.no_learning_margin  # None: the check is off
        if margin is not None and (isinstance(margin, bool) or not isinstance(
                margin, (int, float)) or not 0 <= margin < 0.5):
            raise InputError(f"must be a number in [0, 0.5) or null (off), got {margin!r}",
                             key="no_learning_margin")

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
                  "no_learning_margin": float}
# Fields with a default that also take None (meaning: off).
NULLABLE = ("no_learning_margin",)
TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
              dict: "a mapping"}


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
