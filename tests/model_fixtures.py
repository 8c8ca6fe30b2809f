"""Shared helpers for model tests: a tiny fp32 model and random left-padded batches."""

import pytest
import torch

from malloc_ray.methods import get_method
from malloc_ray.model.ctr import CTRModel
from malloc_ray.model.hstu import HSTUConfig

VOCAB = 60


def tiny_config(layers: int = 3, max_len: int = 40) -> HSTUConfig:
    return HSTUConfig(d_model=32, num_heads=4, num_layers=layers, max_len=max_len, dropout=0.0)


def tiny_model(method: str, layers: int = 3, seed: int = 0, **kwargs) -> CTRModel:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(seed)
    return CTRModel(tiny_config(layers), get_method(method), VOCAB, **kwargs).eval()


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


def serve(model, batch, drop: int = 1):
    """The target's logit through the serving path: prefill the history, score the target."""
    memory = model.prefill(*history(batch, drop))
    return model.score(memory, batch["items"][:, -1:])[:, 0]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are launch-bound: on a shared 2-core machine two threads only contend.
    Autouse in every test module that imports it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_candidates_independent(model, memory, users: int) -> None:
    """Scoring a slate equals scoring each candidate alone, in any order: each candidate sees
    the history and itself only."""
    cands = torch.tensor([[3, 7, 11]] * users)
    several = model.score(memory, cands)
    alone = torch.stack([model.score(memory, cands[:, i:i + 1])[:, 0] for i in range(3)], 1)
    torch.testing.assert_close(several, alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.score(memory, cands.flip(1)), several.flip(1),
                               rtol=0, atol=1e-6)


def assert_appends_match_forward(model, batch, deltas=(1, 3)):
    """Serving oracle: prefill all but the last 1 + delta interactions, append delta of them,
    score the target; the appended items' logits and the target's equal the training forward."""
    full = model.logits(batch).detach()
    for delta in deltas:
        memory = model.prefill(*history(batch, drop=1 + delta))
        new = slice(-1 - delta, -1)
        memory, appended = model.append(memory, batch["items"][:, new], batch["labels"][:, new])
        torch.testing.assert_close(appended, full[:, new], rtol=0, atol=1e-5)
        target = model.score(memory, batch["items"][:, -1:])[:, 0]
        torch.testing.assert_close(target, full[:, -1], rtol=0, atol=1e-5)
    return full
