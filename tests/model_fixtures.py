"""Shared helpers for model tests: a tiny fp32 model and random left-padded batches."""

import torch

from malloc_ray.model.ctr import CTRModel
from malloc_ray.model.hstu import HSTUConfig

VOCAB = 60


def tiny_config(layers: int = 3, max_len: int = 40) -> HSTUConfig:
    return HSTUConfig(d_model=32, num_heads=4, num_layers=layers, max_len=max_len, dropout=0.0)


def tiny_model(method: str, layers: int = 3, seed: int = 0, **kwargs) -> CTRModel:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(seed)
    return CTRModel(tiny_config(layers), method, VOCAB, **kwargs).eval()


def random_batch(lengths, seed: int = 0):
    """Left-padded window batch with the given real lengths (target included)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    b, s = len(lengths), int(lengths.max())
    items = torch.randint(1, VOCAB, (b, s), generator=g)
    labels = torch.randint(0, 2, (b, s), generator=g)
    pad = torch.arange(s)[None, :] < (s - lengths)[:, None]
    items[pad], labels[pad] = 0, 0
    return {"items": items, "labels": labels, "lengths": lengths, "user": torch.arange(b)}


def history(batch, drop: int = 1):
    """The batch minus its last `drop` interactions, still left-padded."""
    return (batch["items"][:, :-drop], batch["labels"][:, :-drop], batch["lengths"] - drop)
