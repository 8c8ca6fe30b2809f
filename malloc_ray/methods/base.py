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

Every method also declares `test_settings`: hyperparameters and batch lengths at which it
really does its job on the tiny test model, so that the registry-driven contract tests
(tests/test_method_contract.py) check it compressing, not at defaults sized for long
histories that leave a 40-interaction test window uncompressed. `setting_problems` says what
a registry's declarations lack.
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


@dataclass(frozen=True)
class TestSetting:
    """One setting at which a method really compresses on the tiny test model
    (tests/model_fixtures.py: d_model 32, 4 heads, max_len 40).

    Defaults are sized for the paper's histories (a 128-token Beacon window, a 32-token KIVI
    residual), so at test size they quantize, condense or prune nothing and the contract tests
    would pass for a method that does nothing. `id` names the pytest case (`kivi-g4r4`);
    `hparams` are raw, as a study spec gives them (`parse_hparams` must accept them);
    `lengths` are the window lengths of the test batch, target included, ragged so that left
    padding is exercised, each at most the tiny model's max_len.
    """

    __test__ = False  # its name starts with "Test": not a pytest test class

    id: str
    hparams: dict
    lengths: tuple[int, ...]


class Method(nn.Module):
    name: ClassVar[str]
    category: ClassVar[str]
    workflow: ClassVar[str] = "trained"
    recompute: ClassVar[bool] = False
    Hparams: ClassVar[type] = NoHparams
    # Declared in each method's own class body (never inherited: a subclass is another method).
    test_settings: ClassVar[tuple[TestSetting, ...]] = ()
    # Serving equals Native's and w/o Mem's logits exactly (with the same weights), at every
    # setting. True only for methods that keep everything or recompute everything.
    lossless: ClassVar[bool] = False
    # Appending k interactions in one step returns the same logits as appending them one at a
    # time (each new item sees the memory, the new interactions before it, and itself; nothing
    # the method keeps depends on how the appends were grouped). Declared in the method's own
    # class body, never inherited (`appends_in_batches`), and checked for every method that
    # declares it (tests/test_method_contract.py). Stream evaluation then appends a user's
    # targets in one step instead of one step per target.
    batched_append: ClassVar[bool] = False

    def __init__(self, cfg: HSTUConfig, hp: Any = None):
        super().__init__()
        self.cfg = cfg
        self.hp = hp if hp is not None else self.Hparams()

    @classmethod
    def appends_in_batches(cls) -> bool:
        """`batched_append` as this class itself declares it (a subclass that changes what is
        kept, e.g. KIVI's quantized Native, must not inherit Native's)."""
        return bool(cls.__dict__.get("batched_append", False))

    @classmethod
    def compresses(cls) -> bool:
        """Whether it must keep strictly fewer bytes per user than Native at the same history
        length: every category but "none" exists to keep less (recompute methods keep 0)."""
        return cls.category != "none"

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

    @classmethod
    def shared_bytes(cls, cfg: HSTUConfig, hp: Any) -> int:
        """Bytes kept once per model for all users (e.g. CollectiveKV's KV pool), all layers:
        fleet memory = shared_bytes + users x per-user bytes. 0 unless a method shares state."""
        return 0


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


def setting_problems(registry: dict[str, type[Method]], max_len: int) -> list[str]:
    """What the registered methods' `test_settings` lack, one sentence each ([]: nothing).

    A registry is passed (not read from REGISTRY) so that a test can check a copy holding a
    throwaway method. `max_len` is the test model's: a setting's windows must fit it.
    """
    return [p for name, cls in sorted(registry.items()) for p in _problems(name, cls, max_len)]


def _problems(name: str, cls: type[Method], max_len: int) -> list[str]:
    where = f"class {cls.__name__} in {cls.__module__.replace('.', '/')}.py"
    own = cls.__dict__.get("test_settings", ())
    if not own:
        inherited = " (inherited settings do not count)" if cls.test_settings else ""
        return [f"method {name!r} declares no test settings{inherited}: add to {where} "
                f"`test_settings = (TestSetting(id=\"...\", hparams={{...}}, lengths=(...)),)` "
                f"(TestSetting from malloc_ray.methods.base) with hyperparameters at which it "
                f"compresses on the tiny test model (tests/model_fixtures.py, max_len {max_len}); "
                f"see docs/methods/README.md, 'Adding a method'"]
    out, ids = [], [s.id for s in own if isinstance(s, TestSetting)]
    if len(set(ids)) != len(ids):
        out.append(f"method {name!r}: test setting ids repeat in {where}: {ids}")
    for s in own:
        out += _setting_problems(name, cls, s, max_len, where)
    return out


def _setting_problems(name, cls, s, max_len, where) -> list[str]:
    if not isinstance(s, TestSetting):
        return [f"method {name!r}: {s!r} in {where} is not a TestSetting"]
    out = []
    if not s.id or not s.id.replace("_", "").replace(".", "").isalnum():
        out.append(f"method {name!r}: test setting id {s.id!r} must be letters, digits, _ or .")
    try:
        cls.parse_hparams(s.hparams)
    except (TypeError, ValueError) as exc:  # InputError is a ValueError
        out.append(f"method {name!r}, setting {s.id!r}: hparams do not parse: {exc}")
    lengths = s.lengths
    if not (isinstance(lengths, tuple) and lengths and
            all(isinstance(n, int) and 1 <= n <= max_len for n in lengths)
            and max(lengths) >= 2):
        out.append(f"method {name!r}, setting {s.id!r}: lengths must be a tuple of ints in "
                   f"[1, {max_len}] with one >= 2 (a user with history), got {lengths!r}")
    return out


def method_names() -> list[str]:
    import malloc_ray.methods  # noqa: F401

    return sorted(REGISTRY)
