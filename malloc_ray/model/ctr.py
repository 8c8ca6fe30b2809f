"""The CTR model: item/label tokens interleaved, an HSTU stack with one memory method, a tied head.

A user's window of S interactions (i_1, y_1), ..., (i_S, y_S) becomes the token sequence
[i_1, y_1, ..., i_{S-1}, y_{S-1}, i_S] (2S - 1 tokens; the target's label is never an input).
The logit of i_t is read from its own token: h(i_t) . (e_1 - e_0), with e the label embedding
(a 2-way head tied to the label embedding, as ArkHSTU does).

Serving splits that pass in two:
    memory = model.prefill(history items, labels, lengths)   # once per user, kept
    logits = model.score(memory, candidates)                 # per request
    memory, item_logits = model.append(memory, items, labels)  # new interactions arrive
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from malloc_ray.errors import InputError
from malloc_ray.methods.base import LayerMemory, get_method
from malloc_ray.model.hstu import HSTUBlock, HSTUConfig

LOSS_POSITIONS = ("all", "last")


@dataclass
class UserMemory:
    """Per-user serving state: one LayerMemory per layer, or the raw ids for recompute methods."""

    layers: list[LayerMemory]
    next_pos: torch.Tensor              # (B,) position the next item token takes
    raw: dict[str, torch.Tensor] | None = None  # recompute methods: history ids (not counted)

    def nbytes(self, metadata: bool = False) -> int:
        return sum(m.nbytes(metadata) for m in self.layers)


class CTRModel(nn.Module):
    def __init__(self, cfg: HSTUConfig, method: str, vocab_size: int, hparams: dict | None = None,
                 loss_positions: str = "all"):
        super().__init__()
        if loss_positions not in LOSS_POSITIONS:
            raise InputError(f"must be one of {LOSS_POSITIONS}, got {loss_positions!r}",
                             key="loss_positions")
        self.cfg, self.loss_positions = cfg, loss_positions
        self.method = get_method(method)
        self.hp = self.method.parse_hparams(hparams)
        self.item_emb = nn.Embedding(vocab_size, cfg.d_model, padding_idx=0)
        self.label_emb = nn.Embedding(2, cfg.d_model)
        self.blocks = nn.ModuleList(HSTUBlock(cfg, self.method(cfg, self.hp))
                                    for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model)
        # Small embeddings: with N(0, 1) the tied head's initial logits have std ~ sqrt(2d),
        # which starts training at a loss of 2+ and saturates the sigmoid.
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.label_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()  # padding_idx row

    # -- tokens ---------------------------------------------------------------------------
    def interleave(self, items, labels, lengths, start=None):
        """Left-padded (B, S) ids -> tokens (B, 2S, d), absolute positions, validity.

        Real tokens of a user get positions start, start+1, ...; padding gets negative ones.
        """
        b, s = items.shape
        item = self.item_emb(items)
        label = self.label_emb(labels)
        if self.cfg.label_carries_item:
            label = label + item
        x = torch.stack([item, label], 2).flatten(1, 2)
        first = 2 * (s - lengths)  # index of the first real token
        pos = torch.arange(2 * s, device=items.device)[None, :] - first[:, None]
        valid = pos >= 0
        if start is not None:
            pos = pos + start[:, None]
        return x, pos, valid

    def head(self, h):
        # Tied 2-way head (Linear(d, 2) with the label embedding as weight); logit = l1 - l0.
        two = F.linear(self.final_norm(h), self.label_emb.weight)
        return two[..., 1] - two[..., 0]

    # -- training path -------------------------------------------------------------------
    def logits(self, batch) -> torch.Tensor:
        """Logits at every item position of the window, (B, S)."""
        x, pos, valid = self.interleave(batch["items"], batch["labels"], batch["lengths"])
        x, pos, valid = x[:, :-1], pos[:, :-1], valid[:, :-1]  # drop the target's label token
        for block in self.blocks:
            x = block(x, pos, valid)
        return self.head(x[:, 0::2])

    def loss(self, batch) -> torch.Tensor:
        logits, labels = self.logits(batch), batch["labels"].float()
        if self.loss_positions == "last":
            loss = F.binary_cross_entropy_with_logits(logits[:, -1], labels[:, -1])
        else:
            s = labels.shape[1]
            real = torch.arange(s, device=labels.device)[None, :] >= (s - batch["lengths"])[:, None]
            per_item = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
            loss = (per_item * real).sum() / real.sum()
        if batch.get("nan_loss"):  # TrialConfig.fault: a deliberately diverging trial
            loss = loss * float("nan")
        return loss

    @torch.no_grad()
    def predict(self, batch) -> torch.Tensor:
        """Click probability of each window's target, through the serving path (prefill the
        history, score the target): evaluation measures exactly what serving would return."""
        items, labels, lengths = batch["items"], batch["labels"], batch["lengths"]
        memory = self.prefill(items[:, :-1], labels[:, :-1], lengths - 1)
        return torch.sigmoid(self.score(memory, items[:, -1:])[:, 0])

    # -- serving path --------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, items, labels, lengths) -> UserMemory:
        """Run a history of interactions (all labels known) and keep what the method keeps."""
        next_pos = 2 * lengths
        if self.method.recompute:
            return UserMemory([], next_pos, raw={"items": items, "labels": labels,
                                                 "lengths": lengths})
        x, pos, valid = self.interleave(items, labels, lengths)
        layers = []
        for block in self.blocks:
            x, memory = block.prefill(x, pos, valid)
            layers.append(memory)
        return UserMemory(layers, next_pos)

    @torch.no_grad()
    def score(self, memory: UserMemory, candidates: torch.Tensor) -> torch.Tensor:
        """Logits of (B, q) candidate items; each sees the history and itself only."""
        b, q = candidates.shape
        x = self.item_emb(candidates)
        pos = memory.next_pos[:, None].expand(b, q)
        if self.method.recompute:
            hx, hpos, hvalid = self.interleave(memory.raw["items"], memory.raw["labels"],
                                               memory.raw["lengths"])
            x = torch.cat([hx, x], 1)
            pos = torch.cat([hpos, pos], 1)
            valid = torch.cat([hvalid, torch.ones_like(pos[:, -q:], dtype=torch.bool)], 1)
            for block in self.blocks:
                x = block(x, pos, valid)
            return self.head(x[:, -q:])
        for block, layer_memory in zip(self.blocks, memory.layers):
            x, _ = block.step(x, pos, layer_memory, append=False)
        return self.head(x)

    @torch.no_grad()
    def append(self, memory: UserMemory, items, labels) -> tuple[UserMemory, torch.Tensor]:
        """Add k interactions per user (B, k); returns the new memory and the logits each new
        item had before its label was known (what the serving system scored)."""
        k = items.shape[1]
        lengths = torch.full_like(memory.next_pos, k)
        x, pos, _ = self.interleave(items, labels, lengths, start=memory.next_pos)
        if self.method.recompute:
            raw = memory.raw
            hx, hpos, hvalid = self.interleave(raw["items"], raw["labels"], raw["lengths"])
            h = torch.cat([hx, x], 1)
            p = torch.cat([hpos, pos], 1)
            v = torch.cat([hvalid, torch.ones_like(pos, dtype=torch.bool)], 1)
            for block in self.blocks:
                h = block(h, p, v)
            new_raw = {"items": torch.cat([raw["items"], items], 1),
                       "labels": torch.cat([raw["labels"], labels], 1),
                       "lengths": raw["lengths"] + k}
            return UserMemory([], memory.next_pos + 2 * k, new_raw), self.head(h[:, -2 * k::2])
        layers = []
        for block, layer_memory in zip(self.blocks, memory.layers):
            x, layer_memory = block.step(x, pos, layer_memory, append=True)
            layers.append(layer_memory)
        return UserMemory(layers, memory.next_pos + 2 * k), self.head(x[:, 0::2])
