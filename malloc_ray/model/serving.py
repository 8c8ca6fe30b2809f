"""Serving: what a user keeps between requests, and how a request uses it. Two ways, one interface.

    CachedServing      every layer keeps its method's LayerMemory; a request steps through it.
    RecomputeServing   nothing is kept but the raw history ids; a request replays
                       [history; new tokens] through the training forward.

CTRModel picks one at init from its method's `recompute` flag and delegates prefill/score/append
to it, so the model itself has no serving branch. Both are stateless: every call takes the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class UserMemory:
    """Per-user serving state: one LayerMemory per layer, or the raw ids for recompute methods."""

    layers: list                        # one LayerMemory (methods/base.py) per layer
    next_pos: torch.Tensor              # (B,) position the next item token takes
    raw: dict[str, torch.Tensor] | None = None  # recompute methods: history ids (not counted)

    def nbytes(self, metadata: bool = False) -> int:
        return sum(m.nbytes(metadata) for m in self.layers)


def new_tokens(model, memory: UserMemory, items, labels):
    """k interactions per user (B, k), all real, as tokens (B, 2k, d) from memory.next_pos on."""
    lengths = torch.full_like(memory.next_pos, items.shape[1])
    x, pos, _ = model.interleave(items, labels, lengths, start=memory.next_pos)
    return x, pos


class CachedServing:
    """Each layer's method keeps a LayerMemory of the history; requests step through it."""

    @staticmethod
    def prefill(model, items, labels, lengths) -> UserMemory:
        x, pos, valid = model.interleave(items, labels, lengths)
        layers = []
        for block in model.blocks:
            x, memory = block.prefill(x, pos, valid)
            layers.append(memory)
        return UserMemory(layers, 2 * lengths)

    @staticmethod
    def score(model, memory: UserMemory, candidates) -> torch.Tensor:
        b, q = candidates.shape
        x = model.item_emb(candidates)
        pos = memory.next_pos[:, None].expand(b, q)
        for block, layer_memory in zip(model.blocks, memory.layers):
            x, _ = block.step(x, pos, layer_memory, append=False)
        return model.head(x)

    @staticmethod
    def append(model, memory: UserMemory, items, labels) -> tuple[UserMemory, torch.Tensor]:
        k = items.shape[1]
        x, pos = new_tokens(model, memory, items, labels)
        layers = []
        for block, layer_memory in zip(model.blocks, memory.layers):
            x, layer_memory = block.step(x, pos, layer_memory, append=True)
            layers.append(layer_memory)
        return UserMemory(layers, memory.next_pos + 2 * k), model.head(x[:, 0::2])


class RecomputeServing:
    """Nothing is kept per user but the history ids; every request replays the whole sequence."""

    @staticmethod
    def replay(model, memory: UserMemory, x, pos) -> torch.Tensor:
        """The training forward over [history; x]; returns the outputs of x's tokens (B, n, d)."""
        raw = memory.raw
        hx, hpos, hvalid = model.interleave(raw["items"], raw["labels"], raw["lengths"])
        h = torch.cat([hx, x], 1)
        p = torch.cat([hpos, pos], 1)
        v = torch.cat([hvalid, torch.ones_like(pos, dtype=torch.bool)], 1)
        for block in model.blocks:
            h = block(h, p, v)
        return h[:, hx.shape[1]:]

    @staticmethod
    def prefill(model, items, labels, lengths) -> UserMemory:
        return UserMemory([], 2 * lengths,
                          raw={"items": items, "labels": labels, "lengths": lengths})

    @classmethod
    def score(cls, model, memory: UserMemory, candidates) -> torch.Tensor:
        b, q = candidates.shape
        pos = memory.next_pos[:, None].expand(b, q)
        return model.head(cls.replay(model, memory, model.item_emb(candidates), pos))

    @classmethod
    def append(cls, model, memory: UserMemory, items, labels) -> tuple[UserMemory, torch.Tensor]:
        k = items.shape[1]
        x, pos = new_tokens(model, memory, items, labels)
        h = cls.replay(model, memory, x, pos)
        raw = memory.raw
        new_raw = {"items": torch.cat([raw["items"], items], 1),
                   "labels": torch.cat([raw["labels"], labels], 1),
                   "lengths": raw["lengths"] + k}
        return UserMemory([], memory.next_pos + 2 * k, new_raw), model.head(h[:, 0::2])
