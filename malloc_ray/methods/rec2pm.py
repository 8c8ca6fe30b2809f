"""Rec2PM: fold each full chunk of history into a few recurrent Preference Memory tokens
(docs/methods/rec2pm.md; Chen et al., arXiv 2602.11605).

The history is cut into chunks of `chunk` tokens by absolute position (chunk c holds positions
[c·L, (c+1)·L)). When a chunk is full, the memory is updated from the old memory and the chunk
("overwriting", the paper's Rec2PM-O):

    M_{c+1} = LN_m( SiLU(Q_m K^T + rab) / n · V ),  K, V over [kv(M_c); raw K,V of chunk c]

with learned per-layer memory queries Q_m (`slots` of them). Per layer and user the server
keeps

    the memory tokens M (token embeddings, width d)   (slots, d)   once a chunk was folded
    raw K,V of the unfinished chunk (working memory)  (H, T, d_h) each, T = N_c mod L

plus an int32 position and a bool validity flag per kept token. The memory is stored as token
embeddings, not as K,V: a request projects kv(M) = SiLU(W_kv^m M) itself (half the bytes of
storing K,V, for slots·d·2D MACs per request); `store_kv` keeps kv(M) instead.

Visibility (one rule for training, prefill, requests and appends, so serving equals forward):
- a raw token of chunk c sees M_c (the memory folded from chunks < c) and the raw tokens of
  chunk c at earlier positions, plus itself. It never sees a memory that folded its own chunk
  (that memory summarises the chunk's later labels);
- the update of chunk c sees M_c and every raw token of chunk c (the chunk is complete).

The memory M_c sits at position c·L − 1 (the last folded position) for the relative bias; the
queries that fold chunk c sit at (c+1)·L − 1, where the new memory will sit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from malloc_ray.methods.base import LayerMemory, TestSetting, register
from malloc_ray.methods.common.glue import (check_bool, check_int, layer_macs, macs_dict,
                                            pair_macs, self_mask, token_macs)
from malloc_ray.methods.native import HSTUAttention
from malloc_ray.model.hstu import merge_heads, pointwise_attention, split_heads, visibility


def chunk_of(pos: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.div(pos, chunk, rounding_mode="floor")


def folded_chunks(m_pos: torch.Tensor, m_valid: torch.Tensor, chunk: int) -> torch.Tensor:
    """Chunks a kept memory has folded, per user: M_c sits at c·L - 1; no memory: 0."""
    if m_pos.shape[1] == 0:
        return m_pos.new_zeros(m_pos.shape[0])
    return torch.where(m_valid[:, 0], chunk_of(m_pos[:, 0] + 1, chunk), 0)


class AddAuxLoss(torch.autograd.Function):
    """Returns y unchanged; in backward, adds d(aux)/d(parameters) with weight 1.

    The training loop only knows the CTR loss, and the contract wants forward's value to be
    serving's exactly. This passes the consistency loss's gradient through y without changing
    any value: loss.backward() then also trains the teacher-forced path.
    """

    @staticmethod
    def forward(ctx, y, aux):
        ctx.save_for_backward(aux)
        return y.clone()

    @staticmethod
    def backward(ctx, grad_y):
        (aux,) = ctx.saved_tensors
        return grad_y, torch.ones_like(aux)


@register
class Rec2PM(HSTUAttention):
    """Recurrent Preference Memory on HSTU's pointwise SiLU attention.

    Adapted from the paper, and why (docs/methods/rec2pm.md):
    - **Per-layer memory.** In the paper the memory is C token embeddings at the model's input:
      [M_{k-1}; S_k; Q_mem] runs through the whole transformer and the outputs at Q_mem are the
      new memory (one set for all layers). Here a method is one layer's mixer and the model
      carries raw tokens only, so every layer keeps and updates its own memory tokens: the
      update is one HSTU attention hop of input-free learned queries q = SiLU(W_q^m e) over
      [kv(M_c); chunk c], M_{c+1} = LN_m(A·V), kv(M) = SiLU(W_kv^m M). Still one token
      embedding (width d) per slot, not its K,V (unless `store_kv`).
    - **Working memory kept as K,V.** The paper re-encodes the raw recent segment S_k at each
      request; a mixer cannot, so the unfinished chunk's raw K,V are kept (counted in bytes).
    - **Simplified: training is not parallel.** Training forward is serving, not the
      paper's teacher-forced local pass. In the paper the
      next-item loss of segment h is computed with the *reference* memory m_{h-1}^ref (from a
      global view) as input, which is what makes training parallel; serving uses the
      recurrent memory. The contract wants forward = serving, so forward runs the recurrence
      (a Python loop over chunks per layer, sequential like backprop through time) and the
      next-item loss flows through it. The paper's self-referential teacher forcing is kept
      as an auxiliary loss (`consistency` = λ, the paper's 1.0): reference memories
      m_h^ref = LN_m(A·V) of the same queries over every raw token of chunks ≤ h (the global
      view, no memory input), teacher-forced updates m_h^tf = update(m_{h-1}^ref, chunk h),
      loss λ·mean‖m_h^tf − m_h^ref‖² over h ≥ 1, both normalised before LN_m's affine (so
      shrinking the memory cannot lower it). The references are targets (stop-gradient: a
      choice, the paper's text does not say) and the raw K,V enter detached, so the loss
      trains the memory's own parameters only, not the backbone (the paper's trains all).
      Its gradient enters through `AddAuxLoss` (forward's value unchanged); the reported
      training loss excludes it. On the tiny amazon profile it neither helped nor hurt.
    - Overwriting only (Rec2PM-O); no appending mode (Rec2PM-A), no one-time compression.
    - **No memory before the first chunk** (chunk 0 sees none); with `chunk` ≥ the sequence
      nothing folds and the layer is Native's causal attention (same parameter names).
    - Chunks by absolute position (token 0 starts chunk 0), as Beacon's windows.
    """

    name = "rec2pm"
    category = "token-merge"
    batched_append = True  # appending k at once = k single appends (contract test)
    # The default chunk (128 tokens) is longer than any test sequence (<= 79 tokens), so it
    # would never fold. Chunks of 5-8 tokens fold up to 8 times per history. Targets sit at
    # positions 2(l - 1) = 40, 14, 8, 6, 24, 32: several right after a fold, with an empty
    # tail (L = 8: 40, 8, 24, 32; L = 6: 6, 24; L = 5: 40); L = 5 also ends chunks on item
    # tokens.
    test_settings = (
        TestSetting(id="c8m4", hparams={"chunk": 8, "slots": 4}, lengths=(21, 8, 5, 4, 13, 17)),
        TestSetting(id="c6m2", hparams={"chunk": 6, "slots": 2}, lengths=(21, 8, 5, 4, 13, 17)),
        TestSetting(id="c5m1", hparams={"chunk": 5, "slots": 1}, lengths=(21, 8, 5, 4, 13, 17)),
        TestSetting(id="c8m4kv", hparams={"chunk": 8, "slots": 4, "store_kv": True},
                    lengths=(21, 8, 5, 4, 13, 17)),
    )

    @dataclass(frozen=True)
    class Hparams:
        chunk: int = 128          # raw tokens per chunk (64 interactions)
        slots: int = 4            # memory tokens per layer (the paper's C = 4)
        consistency: float = 1.0  # λ of the teacher-forcing consistency loss (0: off)
        store_kv: bool = False    # keep the memory's K,V (2·d per slot), not its tokens (d)

        def __post_init__(self):
            check_int("chunk", self.chunk, 1)
            check_int("slots", self.slots, 1)
            lam = self.consistency
            if isinstance(lam, bool) or not isinstance(lam, (int, float)) \
                    or not math.isfinite(lam) or lam < 0:
                raise ValueError(f"consistency must be a finite number >= 0, got {lam!r}")
            check_bool("store_kv", self.store_kv)

    def __init__(self, cfg, hp=None):
        super().__init__(cfg, hp)  # f1, rab, out_norm: Native's parameters, same names
        d = D = cfg.d_model
        self.mem_emb = nn.Embedding(self.hp.slots, d)
        self.mem_q = nn.Linear(d, D, bias=False)
        self.mem_kv = nn.Linear(D, 2 * D, bias=False)
        self.mem_norm = nn.LayerNorm(D)

    # -- memory tokens ----------------------------------------------------------------------
    def memory_queries(self, b: int, repeat: int = 1) -> torch.Tensor:
        q = F.silu(self.mem_q(self.mem_emb.weight))                 # (C, D): input-free
        return split_heads(q[None], self.cfg.num_heads).expand(b, -1, -1, -1).repeat(
            1, 1, repeat, 1)

    def memory_kv(self, m: torch.Tensor):
        k, v = F.silu(self.mem_kv(m)).chunk(2, -1)
        h = self.cfg.num_heads
        return split_heads(k, h), split_heads(v, h)

    def attend_memory(self, q, q_pos, keys, values, k_pos, mask) -> torch.Tensor:
        """Memory queries over keys (mask (B, Nq, Nk)) -> A·V (B, Nq, D), before LN_m."""
        av = pointwise_attention(q, keys, values, self.rab(q_pos, k_pos), mask[:, None],
                                 self.cfg.divisor)
        return merge_heads(av)

    # -- folding full chunks -------------------------------------------------------------
    def fold(self, rk, rv, rpos, rvalid, memory):
        """Update the memory once per full chunk among the raw tokens, in chunk order.

        rk, rv, rpos, rvalid: the raw span [unfinished chunk; new tokens] (valid tokens a
        contiguous suffix starting in the first unfolded chunk). memory: (m, k, v, pos,
        valid) as kept, S = 0 or `slots` tokens (m is None when the memory is stored as K,V).
        Returns the versions the raw tokens read (version r is M_{folded + r}: (k, v, pos,
        valid)) and the kept memory: per user the version after its last full chunk.
        """
        L, C = self.hp.chunk, self.hp.slots
        m, k, v, m_pos, m_valid = memory
        b = rk.shape[0]
        folded = folded_chunks(m_pos, m_valid, L)
        full = (rvalid & ((rpos + 1) % L == 0)).sum(1)              # chunk ends in the span
        versions = [(k, v, m_pos, m_valid)]
        n_folds = int(full.max()) if rpos.shape[1] else 0
        if n_folds == 0:
            return versions, memory
        if k.shape[2] == 0:  # nothing folded yet in the whole batch: pad to `slots`, invisible
            h, dh = rk.shape[1], rk.shape[3]
            k = v = rk.new_zeros(b, h, C, dh)
            m = None if m is None else rk.new_zeros(b, C, self.cfg.d_model)
            m_pos, m_valid = rpos.new_zeros(b, C), rvalid.new_zeros(b, C)
        kept = [[m], [k], [v], [m_pos], [m_valid]]
        qm = self.memory_queries(b)
        raw_chunk = chunk_of(rpos, L)
        for r in range(n_folds):
            c = folded + r                                            # chunk folded now
            q_pos = ((c + 1) * L - 1)[:, None].expand(b, C)
            pk, pv, ppos, pvalid = versions[-1]
            see = torch.cat([pvalid, rvalid & (raw_chunk == c[:, None])], 1)
            keys, values = torch.cat([pk, rk], 2), torch.cat([pv, rv], 2)
            m_new = self.mem_norm(self.attend_memory(qm, q_pos, keys, values,
                                                     torch.cat([ppos, rpos], 1),
                                                     see[:, None, :].expand(-1, C, -1)))
            done = (r < full)[:, None].expand(b, C)                   # users that filled c
            version = (*self.memory_kv(m_new), q_pos, done)
            versions.append(version)
            for acc, t in zip(kept, (m_new, *version)):
                acc.append(t)
        pick = torch.arange(b, device=rpos.device), full              # version `full` per user
        kept = [None if acc[0] is None else torch.stack(acc, 1)[pick] for acc in kept]
        return versions, tuple(kept)

    # -- the teacher-forced path (training only) -----------------------------------------
    def consistency_loss(self, k, v, pos, valid) -> torch.Tensor:
        """The paper's self-referential teacher forcing on a full window (positions from 0).

        Reference m_h^ref: the memory queries over every valid raw token of chunks <= h (the
        global view, no memory input), targets (no gradient). Teacher-forced m_h^tf: the
        update from m_{h-1}^ref and chunk h alone, all h at once. Loss: mean squared
        difference of the two, each normalised before LN_m's affine, over the chunks h >= 1
        a user completed, slots and channels. The raw K,V enter detached: the loss trains
        the memory's own parameters (with its gradient in f1, the tiny amazon run at chunk 8
        stopped learning: AUC 0.48; detached 0.61, as without the loss).
        """
        L, C = self.hp.chunk, self.hp.slots
        b = k.shape[0]
        full = (valid & ((pos + 1) % L == 0)).sum(1)
        n = int(full.max())
        if n < 2:
            return k.new_zeros(())
        k, v = k.detach(), v.detach()  # trains the memory's own parameters, not the backbone
        ends = (torch.arange(n, device=pos.device) + 1) * L - 1       # chunk h ends here
        ref_pos = ends.repeat_interleave(C)[None].expand(b, -1)       # (B, n·C)
        with torch.no_grad():
            see = valid[:, None, :] & (pos[:, None, :] <= ref_pos[:, :, None])
            a_ref = self.attend_memory(self.memory_queries(b, n), ref_pos, k, v, pos, see)
        rk, rv = self.memory_kv(self.mem_norm(a_ref))                 # teacher-forced inputs
        tf_pos = ref_pos[:, C:]                                       # h = 1 .. n-1
        tf_chunk = chunk_of(tf_pos, L)                                # = h
        slot_chunk = chunk_of(ref_pos, L)                             # ref of chunk h-1 -> h-1
        see_ref = slot_chunk[:, None, :] == (tf_chunk - 1)[:, :, None]
        see_raw = valid[:, None, :] & (chunk_of(pos, L)[:, None, :] == tf_chunk[:, :, None])
        a_tf = self.attend_memory(self.memory_queries(b, n - 1), tf_pos,
                                  torch.cat([rk, k], 2), torch.cat([rv, v], 2),
                                  torch.cat([ref_pos, pos], 1), torch.cat([see_ref, see_raw], 2))
        weight = (tf_chunk < full[:, None]).to(a_tf.dtype)            # chunk h was completed
        # Compared before LN_m's affine: after it, shrinking LN_m's gain shrinks both sides
        # and the loss, collapsing the memory (tiny amazon, chunk 8: AUC 0.535 against 0.616
        # without the loss). Normalised, the error is 2·(1 - correlation) per slot.
        D, eps = a_tf.shape[-1], self.mem_norm.eps
        err = (F.layer_norm(a_tf, (D,), eps=eps)
               - F.layer_norm(a_ref[:, C:], (D,), eps=eps)).pow(2).mean(-1)
        return (err * weight).sum() / weight.sum().clamp(min=1)

    # -- one pass over new tokens against what is kept ------------------------------------
    def run(self, x, pos, valid, kept, fold: bool):
        """x: new tokens; kept: (memory, tail), memory (m, k, v, pos, valid), tail (k, v, pos,
        valid), or None. The raw span is [tail; new]. With `fold`, full chunks in the span
        update the memory first (appends and training); a request does not fold (a candidate
        never completes a chunk before itself, and must not change the memory)."""
        u, q, k, v = self.project(x)
        b, h, _, dh = k.shape
        if kept is None:
            none_pos, none_valid = pos[:, :0], valid[:, :0]
            empty = k.new_zeros(b, h, 0, dh)
            m = None if self.hp.store_kv else x.new_zeros(b, 0, x.shape[2])
            kept = ((m, empty, empty, none_pos, none_valid), (empty, empty, none_pos, none_valid))
        memory, tail = kept
        rk, rv = torch.cat([tail[0], k], 2), torch.cat([tail[1], v], 2)
        rpos, rvalid = torch.cat([tail[2], pos], 1), torch.cat([tail[3], valid], 1)
        if fold:
            versions, memory = self.fold(rk, rv, rpos, rvalid, memory)
        else:
            versions = [memory[1:]]
        # raw queries: the memory version of their own chunk, raw tokens of their own chunk
        L = self.hp.chunk
        q_chunk = chunk_of(pos, L)[:, :, None]
        m_pos = torch.cat([ver[2] for ver in versions], 1)
        m_valid = torch.cat([ver[3] for ver in versions], 1)
        see_mem = m_valid[:, None, :] & (chunk_of(m_pos + 1, L)[:, None, :] == q_chunk)
        n_q, n_r = x.shape[1], rk.shape[2]
        same = self_mask(n_q, n_r - n_q, x.device)
        see_raw = visibility(pos, rpos, rvalid, same)[:, 0] & (chunk_of(rpos, L)[:, None, :]
                                                               == q_chunk)
        keys = torch.cat([ver[0] for ver in versions] + [rk], 2)
        values = torch.cat([ver[1] for ver in versions] + [rv], 2)
        k_pos = torch.cat([m_pos, rpos], 1)
        mask = torch.cat([see_mem, see_raw], -1)[:, None]
        av = pointwise_attention(q, keys, values, self.rab(pos, k_pos), mask, self.cfg.divisor)
        y = u * self.out_norm(merge_heads(av))
        return y, memory, (rk, rv, rpos, rvalid)

    def pack(self, memory, raw) -> LayerMemory:
        """Keep the memory (its tokens, or their K,V with `store_kv`) and the raw tokens of
        the unfinished chunk (the last columns: valid tokens are a suffix), sliced to the
        longest such tail in the batch."""
        m, k, v, m_pos, m_valid = memory
        rk, rv, rpos, rvalid = raw
        # the unfinished chunk is the first one the kept memory has not folded
        open_chunk = folded_chunks(m_pos, m_valid, self.hp.chunk)
        in_tail = rvalid & (chunk_of(rpos, self.hp.chunk) >= open_chunk[:, None])
        t = int(in_tail.sum(1).max()) if rpos.shape[1] else 0
        n = rpos.shape[1]
        kept = {"memory_k": k, "memory_v": v} if self.hp.store_kv else {"memory": m}
        return LayerMemory(
            payload={**kept, "tail_k": rk[:, :, n - t:], "tail_v": rv[:, :, n - t:]},
            metadata={"memory_pos": m_pos.to(torch.int32), "memory_valid": m_valid,
                      "tail_pos": rpos[:, n - t:].to(torch.int32),
                      "tail_valid": in_tail[:, n - t:]})

    def unpack(self, memory: LayerMemory, dtype):
        """What `pack` kept, with the memory's K,V (projected from its tokens unless
        `store_kv`: the bytes-for-MACs trade of keeping tokens)."""
        p, meta = memory.payload, memory.metadata
        if self.hp.store_kv:
            m, k, v = None, p["memory_k"], p["memory_v"]
        else:
            m = p["memory"]
            k, v = self.memory_kv(m)
        return ((m, k, v, meta["memory_pos"].to(dtype), meta["memory_valid"]),
                (p["tail_k"], p["tail_v"], meta["tail_pos"].to(dtype), meta["tail_valid"]))


    # -- the contract ---------------------------------------------------------------------
    def forward(self, x, pos, valid):
        y, _, raw = self.run(x, pos, valid, None, fold=True)
        if self.hp.consistency > 0 and self.training and torch.is_grad_enabled():
            aux = self.consistency_loss(raw[0], raw[1], raw[2], raw[3])
            if aux.requires_grad:
                y = AddAuxLoss.apply(y, self.hp.consistency * aux)
        return y

    def prefill(self, x, pos, valid):
        y, memory, raw = self.run(x, pos, valid, None, fold=True)
        return y, self.pack(memory, raw)

    def step(self, x, pos, memory, append):
        kept = self.unpack(memory, pos.dtype)
        valid = torch.ones_like(pos, dtype=torch.bool)
        y, new_memory, raw = self.run(x, pos, valid, kept, fold=append)
        if append:
            memory = self.pack(new_memory, raw)
        return y, memory

    @classmethod
    def kept(cls, hp, n_cached: int) -> tuple[int, int]:
        """(memory tokens, raw tail tokens) kept after n_cached history tokens."""
        return (hp.slots if n_cached >= hp.chunk else 0), n_cached % hp.chunk

    @classmethod
    def memory_bytes(cls, cfg, hp, n_cached, metadata=False):
        slots, tail = cls.kept(hp, n_cached)
        per_slot = (2 if hp.store_kv else 1) * cfg.d_model * 4           # fp32 token or K,V
        payload = slots * per_slot + tail * 2 * cfg.d_model * 4
        return payload + ((slots + tail) * (4 + 1) if metadata else 0)   # int32 pos + bool

    @classmethod
    def fold_macs(cls, cfg, hp, n_cached: int) -> tuple[int, int]:
        """(all, matmul) MACs of a prefill's folds, as computed: the memory queries once
        (C·d·D + SiLU), per fold C queries against [old memory; the whole span] (dense,
        masked to the chunk), LN_m, and kv(M) of the new memory (C·D·2D + SiLU)."""
        folds = n_cached // hp.chunk
        if folds == 0:
            return 0, 0
        d = D = cfg.d_model
        C = hp.slots
        pair, pair_mm = pair_macs(cfg)
        pairs = C * (folds * n_cached + (folds - 1) * C)  # the first fold has no old memory
        matmul = C * d * D + pairs * pair_mm + folds * C * D * 2 * D
        return matmul + C * D + pairs * (pair - pair_mm) + folds * C * (2 * D + 2 * D), matmul

    @classmethod
    def macs(cls, cfg, hp, n_cached, q=1):
        tok, pair = token_macs(cfg), pair_macs(cfg)
        D = cfg.d_model
        slots, tail = cls.kept(hp, n_cached)
        keys = slots + tail + q                 # dense over [memory; unfinished chunk; cands]
        # kept as tokens, the memory's K,V are projected per request (once, not per candidate)
        project = 0 if hp.store_kv else slots * D * 2 * D
        project_silu = 0 if hp.store_kv else slots * 2 * D
        # prefill as computed: every history row against [every memory version; all raw]
        versions = (n_cached // hp.chunk) * hp.slots
        prefill_pairs = n_cached * (versions + n_cached)
        return macs_dict(layer_macs(tok, pair, q, q * keys, (project + project_silu, project)),
                         layer_macs(tok, pair, n_cached, prefill_pairs,
                                    cls.fold_macs(cfg, hp, n_cached)),
                         prefill_matmul=True)
