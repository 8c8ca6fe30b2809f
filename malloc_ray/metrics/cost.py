"""What serving one user costs: memory bytes (measured from tensors) and MACs per request.

Bytes are measured on a one-user prefill, so no padding is counted. MACs come in closed form
from the method (`Method.macs`, per layer) plus the tied head; `flop_counter_macs` runs the
real request under `torch.utils.flop_counter.FlopCounterMode` as a cross-check of the matmul
part (FlopCounterMode counts matmuls only, FLOPs = 2 x MACs).
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
    """The cost fields a trial reports: bytes per user and MACs per request."""
    nbytes = measure_user_bytes(model, n_history)
    macs = closed_form_macs(model, n_history)
    return {"kv_bytes_per_user": nbytes["payload"],
            "kv_bytes_per_user_with_metadata": nbytes["with_metadata"],
            "macs_per_request": macs["request"], "macs_prefill": macs["prefill"]}
