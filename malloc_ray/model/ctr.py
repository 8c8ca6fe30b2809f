"""The CTR model: item/label tokens interleaved, an HSTU stack with one memory method, a tied head.

A user's window of S interactions (i_1, y_1), ..., (i_S, y_S) becomes the token sequence
[i_1, y_1, ..., i_{S-1}, y_{S-1}, i_S] (2S - 1 tokens; the target's label is never an input).
The logit of i_t is read from its own token: h(i_t) . (e_1 - e_0), with e the label embedding
(a 2-way head tied to the label embedding, as ArkHSTU does).

Serving splits that pass in two:
    memory = model.prefill(history items, labels, lengths)   # once per user, kept
    logits = model.score(memory, candidates)                 # per request
    memory, item_logits = model.append(memory, items, labels)  # new interactions arrive
model/serving.py holds both ways of doing it (cached layer memory, or recompute from raw ids).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from malloc_ray.config import LOSS_POSITIONS
from malloc_ray.errors import InputError
from malloc_ray.model.hstu import HSTUBlock, HSTUConfig
from malloc_ray.model.serving import CachedServing, RecomputeServing, UserMemory


class CTRModel(nn.Module):
    """`method_cls` is a memory-method class (malloc_ray.methods.get_method(name)): the model is
    handed it rather than looking a name up, so model/ never imports the method registry."""

    def __init__(self, cfg: HSTUConfig, method_cls: type[nn.Module], vocab_size: int,
                 hparams: dict | None = None, loss_positions: str = "all"):
        super().__init__()
        if isinstance(method_cls, str):
            raise TypeError(f"CTRModel takes a method class, not a name: pass "
                            f"malloc_ray.methods.get_method({method_cls!r})")
        trained = tuple(p for p in LOSS_POSITIONS if p != "auto")  # "auto" names the dataset's
        if loss_positions not in trained:  # choice: resolve it with the dataset first
            raise InputError(f"must be one of {trained}, got {loss_positions!r}",
                             key="loss_positions")
        self.cfg, self.loss_positions = cfg, loss_positions
        self.method = method_cls
        self.hp = self.method.parse_hparams(hparams)
        self.serving = RecomputeServing if method_cls.recompute else CachedServing
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

    def loss_targets(self, batch) -> torch.Tensor:
        """How many targets `loss` trains on: the loop's evaluation cadence counts these."""
        if self.loss_positions == "last":
            return batch["labels"].shape[0]
        return batch["lengths"].sum()

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
        if "targets" in batch:
            return self.predict_stream(batch)
        items, labels, lengths = batch["items"], batch["labels"], batch["lengths"]
        memory = self.prefill(items[:, :-1], labels[:, :-1], lengths - 1)
        return torch.sigmoid(self.score(memory, items[:, -1:])[:, 0])

    @torch.no_grad()
    def predict_stream(self, batch, batched: bool | None = None) -> torch.Tensor:
        """A stream batch (data/streams.py): prefill each history once, then per target in
        time order append it with its label; the logit append returns for it is what it was
        scored before its label was known. Methods that declare `batched_append` append all
        of a user's targets in one step (`batched=False` forces one step per target, the
        oracle). Probabilities of the real targets, row-major."""
        memory = self.prefill(batch["items"], batch["labels"], batch["lengths"])
        if self.method.appends_in_batches() if batched is None else batched:
            if not self.method.appends_in_batches():
                raise ValueError(f"{self.method.name} does not declare batched_append")
            # Same logits as the loop below: the method declares it, the contract tests check
            # it. (A batch of data/streams.py holds users with one target count; where a mask
            # pads, the padding comes after a user's real targets, which do not see it.)
            _, logits = self.append(memory, batch["targets"], batch["target_labels"])
            return torch.sigmoid(logits[batch["target_mask"]])
        logits = []
        for j in range(batch["targets"].shape[1]):
            memory, logit = self.append(memory, batch["targets"][:, j:j + 1],
                                        batch["target_labels"][:, j:j + 1])
            logits.append(logit[:, 0])
        return torch.sigmoid(torch.stack(logits, 1)[batch["target_mask"]])

    # -- serving path (model/serving.py) ------------------------------------------------
    @torch.no_grad()
    def prefill(self, items, labels, lengths) -> UserMemory:
        """Run a history of interactions (all labels known) and keep what the method keeps."""
        return self.serving.prefill(self, items, labels, lengths)

    @torch.no_grad()
    def score(self, memory: UserMemory, candidates: torch.Tensor) -> torch.Tensor:
        """Logits of (B, q) candidate items; each sees the history and itself only."""
        return self.serving.score(self, memory, candidates)

    @torch.no_grad()
    def append(self, memory: UserMemory, items, labels) -> tuple[UserMemory, torch.Tensor]:
        """Add k interactions per user (B, k); returns the new memory and the logits each new
        item had before its label was known (what the serving system scored)."""
        return self.serving.append(self, memory, items, labels)
