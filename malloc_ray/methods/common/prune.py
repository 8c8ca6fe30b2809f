"""`TokenPrune`, the base of the per-head token-pruning methods (h2o.py, snapkv.py; no method
of its own; docs/methods/h2o.md).

A pruned memory keeps, per layer, user and head, at most `budget` history tokens: their K, V
and their ORIGINAL positions, so the relative bias of a later query is the one full attention
would give. Heads choose independently, so positions are stored per head:

    payload  k, v   (B, H, K, d_h)   K = min(budget, cached tokens)
    metadata pos    (B, H, K) int32  original positions, ascending along K
             valid  (B, H, K) bool   False only for padding of users shorter than the batch

Invariant relied on below: along every token axis positions ascend and invalid (padding)
entries come first, as in a left-padded window. Selection keeps that order.

A method only says how it ranks tokens (`prefill_priority`, `append_priority`): +inf for
tokens it must keep, a score for the others; padding is forced to -inf here. Selection is a
stable sort, so equal scores keep the earlier position: deterministic and batch-independent.

Post-hoc: the class subclasses Native and adds no parameters, so a trained Native
state_dict loads with strict=True. `forward` is full exact attention for every row except the
target (the last column: windows are left-padded), which sees exactly the memory `prefill`
would keep for the history before it, plus itself. That makes step-after-prefill equal to
forward at the target while rows before it stay exact.
"""

from __future__ import annotations

import torch

from malloc_ray.methods.base import LayerMemory
from malloc_ray.methods.common.glue import (join_cached, layer_macs, macs_dict, pair_macs,
                                            pointwise_weights, self_mask, token_macs)
from malloc_ray.methods.native import Native
from malloc_ray.model.hstu import RelativeBias, merge_heads, relative_bucket, visibility

INF = float("inf")


# -- per-head attention over kept tokens ---------------------------------------------------
def head_bias(rab: RelativeBias, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """q_pos (B, Nq), per-head k_pos (B, H, Nk) -> (B, H, Nq, Nk): head h reads its own keys.

    Same values as `RelativeBias.forward` (table[bucket(q - k), h]), indexed per head.
    """
    dist = q_pos[:, None, :, None].long() - k_pos[:, :, None, :].long()
    bucket = relative_bucket(dist, rab.num_buckets, rab.max_distance)
    heads = torch.arange(k_pos.shape[1], device=k_pos.device)[None, :, None, None]
    return rab.table.weight[bucket, heads]


def head_visibility(q_pos, k_pos, k_valid, same) -> torch.Tensor:
    """`hstu.visibility` with per-head keys: (B, H, Nq, Nk) bool."""
    earlier = k_pos[:, :, None, :] < q_pos[:, None, :, None]
    return (earlier | same) & k_valid[:, :, None, :]


def attention_weights(q, k, bias, mask, divisor: float) -> torch.Tensor:
    """A = SiLU(QK^T + rab) / n, masked: the same ops as `hstu.pointwise_attention`, but the
    weights are returned because the pruning scores are read from them."""
    return pointwise_weights(torch.matmul(q, k.transpose(-1, -2)) + bias, mask, divisor)


# -- selection -----------------------------------------------------------------------------
def most_recent(pos: torch.Tensor, valid: torch.Tensor, r: int) -> torch.Tensor:
    """(B, H, N) bool: the r valid tokens with the largest positions (all of them if fewer)."""
    if r <= 0 or pos.shape[-1] == 0:
        return torch.zeros_like(valid)
    masked = torch.where(valid, pos.long(), torch.iinfo(torch.long).min)
    kth = masked.topk(min(r, pos.shape[-1]), dim=-1).values[..., -1:]
    return valid & (masked >= kth)


def keep_indices(priority: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices (B, H, min(budget, N)) of the highest priorities, ascending.

    Stable descending sort: ties go to the lower index, i.e. the earlier position.
    """
    k = min(budget, priority.shape[-1])
    order = torch.sort(priority, dim=-1, descending=True, stable=True).indices[..., :k]
    return order.sort(dim=-1).values


def gather_tokens(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (B, H, N, ...) -> (B, H, K, ...) at idx (B, H, K)."""
    idx = idx.reshape(*idx.shape, *([1] * (t.dim() - 3))).expand(*idx.shape, *t.shape[3:])
    return torch.gather(t, 2, idx)


class TokenPrune(Native):
    """Native's layer with a memory of at most `hp.budget` tokens per head (see module doc)."""

    category = "token-prune"
    workflow = "post-hoc"
    lossless = False  # Native's subclass, but a pruned memory changes the target's score
    state_keys: tuple[str, ...] = ()  # extra per-token metadata a method carries (H2O: scores)

    # -- what a method defines ------------------------------------------------------------
    def prefill_priority(self, w, mask, pos, valid) -> tuple[torch.Tensor, dict]:
        """History attention w (B, H, N, N) -> (priority (B, H, N), state (B, H, N) each)."""
        raise NotImplementedError

    def append_priority(self, memory, w, mask, pos, valid) -> tuple[torch.Tensor, dict]:
        """Rows of the appended tokens over [memory; new] (B, H, n_new, K + n_new)."""
        raise NotImplementedError

    # -- memory ---------------------------------------------------------------------------
    def keep(self, priority, k, v, pos, valid, state) -> LayerMemory:
        priority = priority.masked_fill(~valid, -INF)  # padding goes only where nothing's left
        idx = keep_indices(priority, self.hp.budget)
        metadata = {"pos": gather_tokens(pos, idx).to(torch.int32),
                    "valid": gather_tokens(valid, idx)}
        metadata.update({name: gather_tokens(state[name], idx) for name in self.state_keys})
        return LayerMemory(payload={"k": gather_tokens(k, idx), "v": gather_tokens(v, idx)},
                           metadata=metadata)

    def compress(self, w, mask, k, v, pos, valid) -> LayerMemory:
        """The memory of a history whose exact attention weights are w (B, H, N, N)."""
        h = self.cfg.num_heads
        pos = pos[:, None].expand(-1, h, -1)
        valid = valid[:, None].expand(-1, h, -1)
        priority, state = self.prefill_priority(w, mask, pos, valid)
        return self.keep(priority, k, v, pos, valid, state)

    def full(self, u, q, k, v, pos, valid):
        """Exact attention over the whole sequence; also returns weights and mask."""
        mask = visibility(pos, pos, valid, self_mask(q.shape[2], 0, q.device))
        w = attention_weights(q, k, self.rab(pos, pos), mask, self.cfg.divisor)
        return u * self.out_norm(merge_heads(torch.matmul(w, v))), w, mask

    def attend_memory(self, u, q, k, v, pos, memory):
        """New tokens against [kept tokens; themselves]; returns y and what the update needs."""
        mem = memory.payload
        keys, values = torch.cat([mem["k"], k], 2), torch.cat([mem["v"], v], 2)
        # per-head kept positions (B, H, K): the own tokens' are broadcast to every head
        k_pos, k_valid, same = join_cached(memory.metadata["pos"], memory.metadata["valid"], pos)
        mask = head_visibility(pos, k_pos, k_valid, same)
        w = attention_weights(q, keys, head_bias(self.rab, pos, k_pos), mask, self.cfg.divisor)
        y = u * self.out_norm(merge_heads(torch.matmul(w, values)))
        return y, (w, mask, keys, values, k_pos, k_valid)

    # -- the contract ---------------------------------------------------------------------
    def forward(self, x, pos, valid):
        if not bool(valid[:, -1].all()):
            raise ValueError(f"{self.name}: forward expects left-padded windows (the target, "
                             "the last valid token, in the last column)")
        u, q, k, v = self.project(x)
        y, w, mask = self.full(u, q, k, v, pos, valid)
        # The history rows of the full matrix are exactly prefill's (the target is later, so
        # its column is masked for them): select from them as prefill does.
        memory = self.compress(w[..., :-1, :-1], mask[..., :-1, :-1], k[:, :, :-1],
                               v[:, :, :-1], pos[:, :-1], valid[:, :-1])
        y_target, _ = self.attend_memory(u[:, -1:], q[:, :, -1:], k[:, :, -1:], v[:, :, -1:],
                                         pos[:, -1:], memory)
        return torch.cat([y[:, :-1], y_target], 1)

    def prefill(self, x, pos, valid):
        u, q, k, v = self.project(x)
        y, w, mask = self.full(u, q, k, v, pos, valid)
        return y, self.compress(w, mask, k, v, pos, valid)

    def step(self, x, pos, memory, append):
        u, q, k, v = self.project(x)
        y, (w, mask, keys, values, k_pos, k_valid) = self.attend_memory(u, q, k, v, pos, memory)
        if append:
            priority, state = self.append_priority(memory, w, mask, k_pos, k_valid)
            memory = self.keep(priority, keys, values, k_pos, k_valid, state)
        return y, memory

    @classmethod
    def memory_bytes(cls, cfg, hp, n_cached, metadata=False):
        kept = min(hp.budget, n_cached)
        payload = 2 * kept * cfg.d_model * 4                       # K and V, fp32
        per_token_head = 4 + 1 + 4 * len(cls.state_keys)           # int32 pos, bool valid, state
        return payload + (cfg.num_heads * kept * per_token_head if metadata else 0)

    @classmethod
    def scoring_macs(cls, cfg, hp, n_cached) -> int:
        raise NotImplementedError

    @classmethod
    def macs(cls, cfg, hp, n_cached, q=1):
        tok, pair = token_macs(cfg), pair_macs(cfg)
        keys = min(hp.budget, n_cached) + q  # kept tokens + the candidates' own (dense rows)
        scoring = cls.scoring_macs(cfg, hp, n_cached)  # not a matmul
        return macs_dict(layer_macs(tok, pair, q, q * keys),
                         layer_macs(tok, pair, n_cached, n_cached * n_cached, (scoring, 0)))
