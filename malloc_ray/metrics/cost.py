"""What serving one user costs: memory bytes (measured from tensors) and MACs per request.

Bytes are measured on a one-user prefill, so no padding is counted. The headline per-user
figure, `kv_bytes_per_user`, is everything the server keeps for that user: payload and
metadata (residual windows, pivots, quantizer scales, kept positions, validity flags). The
payload alone (`kv_payload_bytes_per_user`, what the paper's Table 3 counts) is a second
figure, never the headline: at the paper's scale it leaves out 60% of KIVI's real state.

MACs come in closed form from the method (`Method.macs`, per layer) plus the tied head;
`flop_counter_macs` runs the real request under `torch.utils.flop_counter.FlopCounterMode` as
a cross-check of the matmul part (FlopCounterMode counts matmuls only, FLOPs = 2 x MACs).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from malloc_ray.model.ctr import CTRModel


def _one_user(model: CTRModel, n_history: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    vocab = model.item_emb.num_embeddings
    device = model.item_emb.weight.device
    items = torch.randint(1, vocab, (1, n_history), generator=g).to(device)
    labels = torch.randint(0, 2, (1, n_history), generator=g).to(device)
    lengths = torch.tensor([n_history], device=device)
    target = torch.randint(1, vocab, (1, 1), generator=g).to(device)
    return items, labels, lengths, target


def measure_user_bytes(model: CTRModel, n_history: int) -> dict[str, int]:
    """Bytes one user's memory takes after a prefill of n_history interactions."""
    was_training = model.training
    model.eval()
    items, labels, lengths, _ = _one_user(model, n_history)
    memory = model.prefill(items, labels, lengths)
    model.train(was_training)
    return {"payload": memory.nbytes(metadata=False), "with_metadata": memory.nbytes(metadata=True)}


def closed_form_macs(model: CTRModel, n_history: int, q: int = 1) -> dict[str, int]:
    """Per request with q candidates after n_history interactions (2 * n_history cached tokens).

    Embedding lookups are excluded (as in the paper); the final LayerNorm (2 ops per element)
    and the tied head (d -> 2) of each candidate are included.
    """
    cfg = model.cfg
    per_layer = model.method.macs(cfg, model.hp, 2 * n_history, q)
    head_mm = q * 2 * cfg.d_model
    head = head_mm + q * 2 * cfg.d_model
    return {"request": cfg.num_layers * per_layer["request"] + head,
            "request_matmul": cfg.num_layers * per_layer["request_matmul"] + head_mm,
            "prefill": cfg.num_layers * per_layer["prefill"]}


def flop_counter_macs(model: CTRModel, n_history: int, q: int = 1) -> int:
    """Matmul MACs torch counts for one real request (prefill excluded)."""
    model.eval()
    items, labels, lengths, _ = _one_user(model, n_history)
    memory = model.prefill(items, labels, lengths)
    candidates = torch.randint(1, model.item_emb.num_embeddings, (1, q),
                               device=items.device)
    with FlopCounterMode(display=False) as counter:
        model.score(memory, candidates)
    return counter.get_total_flops() // 2


def cost_summary(model: CTRModel, n_history: int) -> dict[str, int]:
    """The cost fields a trial reports: bytes per user (total, then payload only) and MACs
    per request."""
    nbytes = measure_user_bytes(model, n_history)
    macs = closed_form_macs(model, n_history)
    return {"kv_bytes_per_user": nbytes["with_metadata"],
            "kv_payload_bytes_per_user": nbytes["payload"],
            "macs_per_request": macs["request"], "macs_prefill": macs["prefill"]}


PAPER_SCALE = dict(d_model=256, num_heads=8, num_layers=32)  # the paper's Table 3 model


def cost_table(profile: str, paper_compat: bool = False) -> list[dict]:
    """Per registered method at the paper's scale (32 layers, d=256, 8 heads, L=1024 or 128):
    our closed-form MACs per request and bytes per user (`kv_bytes_per_user`: payload and
    metadata; `kv_payload_bytes_per_user`: payload only) for L-1 history interactions, and
    with `paper_compat` the paper-compatible counters (payload only, the paper's convention)
    and the paper's printed Table 3 beside them.

    Closed forms are used because they are cheap at this scale; the tests assert that they
    equal the bytes measured from real tensors and the matmul MACs FlopCounterMode counts.
    """
    from malloc_ray.methods import REGISTRY, method_names
    from malloc_ray.metrics.paper_compat import PROFILES, paper_table3
    from malloc_ray.model.hstu import HSTUConfig

    L = PROFILES[profile]
    cfg = HSTUConfig(max_len=L, dropout=0.0, **PAPER_SCALE)
    paper = paper_table3(profile) if paper_compat else {}
    rows = []
    for name in method_names():
        cls = REGISTRY[name]
        hp = cls.Hparams()
        n_cached = 2 * (L - 1)
        per_layer = cls.macs(cfg, hp, n_cached, 1)
        row = {"method": name, "category": cls.category, "workflow": cls.workflow,
               "macs_per_request": cfg.num_layers * per_layer["request"] + 4 * cfg.d_model,
               "kv_bytes_per_user": cfg.num_layers * cls.memory_bytes(cfg, hp, n_cached, True),
               "kv_payload_bytes_per_user":
                   cfg.num_layers * cls.memory_bytes(cfg, hp, n_cached, False),
               # kept once per model, not per user (CollectiveKV's pool); 0 for the others
               "shared_bytes": cls.shared_bytes(cfg, hp)}
        if paper_compat:
            compat = paper.get(name, {})
            row.update({"paper_compat_macs": compat.get("macs"),
                        "paper_compat_bytes": compat.get("bytes"),
                        "paper_macs": compat.get("paper_macs"),
                        "paper_mib": compat.get("paper_mib")})
        rows.append(row)
    return rows
