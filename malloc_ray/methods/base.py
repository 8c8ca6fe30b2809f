"""The memory-method contract and its registry.

A method is the attention part ("mixer") of every HSTU layer: it owns the projections, the
attention and what is kept per user. One class per method, found by name:

    forward(x, pos, valid)            -> y                 training / full-sequence path
    prefill(x, pos, valid)            -> (y, LayerMemory)  the history; y feeds the next layer
    step(x, pos, memory, append)      -> (y, LayerMemory)  a request; append=True adds the tokens
    memory_bytes(cfg, hp, n, metadata)-> int               closed form, one user, one layer
    macs(cfg, hp, n_cached, q)        -> dict              closed form, one layer

x is the layer input after the block's LayerNorm, (B, N, d); pos are absolute token positions
(B, N); valid marks real (non-padding) tokens. y is (B, N, d) and goes to the block's f2.

Recompute methods (`recompute = True`) keep nothing: the model stores the raw history ids and
re-runs `forward` for each request.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from malloc_ray.errors import InputError
from malloc_ray.model.hstu import HSTUConfig

CATEGORIES = ("none", "sequence", "token-merge", "token-prune", "head", "precision", "architecture")
WORKFLOWS = ("trained", "post-hoc")

REGISTRY: dict[str, type["Method"]] = {}


@dataclass
class LayerMemory:
    """What one layer keeps for a batch of users: payload tensors and bookkeeping tensors.

    Bytes are counted from the tensors themselves (numel * element_size), so a packed
    quantized payload counts at its packed size. Measure per-user bytes on a one-user prefill.
    """

    payload: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, torch.Tensor] = field(default_factory=dict)

    def nbytes(self, metadata: bool = False) -> int:
        tensors = list(self.payload.values()) + (list(self.metadata.values()) if metadata else [])
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class NoHparams:
    pass


class Method(nn.Module):
    name: ClassVar[str]
    category: ClassVar[str]
    workflow: ClassVar[str] = "trained"
    recompute: ClassVar[bool] = False
    Hparams: ClassVar[type] = NoHparams

    def __init__(self, cfg: HSTUConfig, hp: Any = None):
        super().__init__()
        self.cfg = cfg
        self.hp = hp if hp is not None else self.Hparams()

    @classmethod
    def parse_hparams(cls, raw: dict | None) -> Any:
        """Hyperparameters from a config dict; unknown keys and bad values are errors."""
        raw = dict(raw or {})
        known = {f.name for f in dataclasses.fields(cls.Hparams)}
        for key in raw:
            if key not in known:
                raise InputError(f"unknown hyperparameter for method '{cls.name}'; known: "
                                 f"{sorted(known) or 'none'}", key=key)
        try:
            return cls.Hparams(**raw)
        except (TypeError, ValueError) as exc:
            raise InputError(f"bad hyperparameters for method '{cls.name}': {exc}",
                             key="hparams") from exc

    # -- the contract -------------------------------------------------------------------
    def forward(self, x: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # Recompute methods get these three for free: nothing kept, 0 bytes, no layer step.
    def prefill(self, x, pos, valid) -> tuple[torch.Tensor, LayerMemory]:
        if self.recompute:
            return self.forward(x, pos, valid), LayerMemory()
        raise NotImplementedError

    def step(self, x, pos, memory: LayerMemory, append: bool) -> tuple[torch.Tensor, LayerMemory]:
        if self.recompute:
            raise RuntimeError(f"{self.name} keeps no layer state: CTRModel.score recomputes "
                               "from the raw history ids")
        raise NotImplementedError

    @classmethod
    def memory_bytes(cls, cfg: HSTUConfig, hp: Any, n_cached: int, metadata: bool = False) -> int:
        if cls.recompute:
            return 0
        raise NotImplementedError

    @classmethod
    def macs(cls, cfg: HSTUConfig, hp: Any, n_cached: int, q: int = 1) -> dict[str, int]:
        """Per layer: `request` (all counted ops), `request_matmul` (matmuls only, what
        torch's FlopCounterMode sees, FLOPs = 2 x MACs) and `prefill`."""
        raise NotImplementedError


def register(cls: type[Method]) -> type[Method]:
    if cls.category not in CATEGORIES:
        raise ValueError(f"{cls.__name__}: category {cls.category!r} not in {CATEGORIES}")
    if cls.workflow not in WORKFLOWS:
        raise ValueError(f"{cls.__name__}: workflow {cls.workflow!r} not in {WORKFLOWS}")
    if cls.name in REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    import malloc_ray.methods  # noqa: F401  (registers every method module)

    try:
        return REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown method '{name}'; registered: {', '.join(sorted(REGISTRY))}",
                         key="method") from None


def method_names() -> list[str]:
    import malloc_ray.methods  # noqa: F401

    return sorted(REGISTRY)
