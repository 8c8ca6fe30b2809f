"""Rec2PM, recurrent Preference Memory (docs/methods/rec2pm.md). fp32, dropout 0.

The default chunk (128 tokens) is longer than the tiny model's windows (<= 79 tokens), so the
method declares test settings with chunks of 5-8 (`Rec2PM.test_settings`); the registry-driven
contract tests (tests/test_method_contract.py) check leakage, serving = forward, bytes and
request MACs there. The tests here check what is Rec2PM's own: the batched forward against a
plain per-user recurrence, the degenerate case (no fold = Native), a memory of constant size,
appends, prefill MACs and the teacher-forcing consistency loss.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import malloc_ray.methods.rec2pm  # noqa: F401  (registers rec2pm)
from malloc_ray.errors import InputError
from malloc_ray.methods.rec2pm import Rec2PM
from malloc_ray.metrics.cost import closed_form_macs, flop_counter_macs, measure_user_bytes
from malloc_ray.model.hstu import merge_heads, pointwise_attention_reference, split_heads
# one_thread is an autouse fixture: importing it applies it here
from model_fixtures import (assert_candidates_independent, history,  # noqa: F401
                            one_thread,
                            random_batch, serve, tiny_model)

LENGTHS = [21, 8, 5, 4, 13, 17]         # targets at 40, 14, 8, 6, 24, 32
APPEND_LENGTHS = [21, 8, 5, 13, 17, 10]  # 5: an empty history after dropping 5
SETTINGS = [s.hparams for s in Rec2PM.test_settings]
IDS = [s.id for s in Rec2PM.test_settings]


# -- a plain reference: one user, token by token, chunk by chunk -------------------------
def attend_one(mixer, q, q_pos, keys, values, k_pos):
    """One HSTU attention row set, every key visible: q (H, Nq, dh), keys (H, Nk, dh)."""
    bias = mixer.rab(q_pos[None], k_pos[None])[0]
    ones = torch.ones(q.shape[1], keys.shape[1])
    return pointwise_attention_reference(q, keys, values, bias, ones, mixer.cfg.divisor)


def reference_mixer(mixer, x, n_valid):
    """The recurrence as the paper states it, for one left-padded user (x (N, d), the last
    n_valid tokens real, positions 0..n_valid-1): a token of chunk c attends to kv(M_c) and
    the earlier tokens of its chunk and itself; when chunk c is complete,
    M_{c+1} = LN_m(queries over [kv(M_c); chunk c])."""
    L, h = mixer.hp.chunk, mixer.cfg.num_heads
    x = x[-n_valid:] if n_valid else x[:0]
    u, q, k, v = mixer.project(x[None])
    q, k, v = q[0], k[0], v[0]
    qm = split_heads(F.silu(mixer.mem_q(mixer.mem_emb.weight))[None], h)[0]
    memory = None  # (k, v, pos) of M_c
    out = []
    for t in range(n_valid):
        c = t // L
        keys, values, k_pos = k[:, c * L:t + 1], v[:, c * L:t + 1], torch.arange(c * L, t + 1)
        if memory is not None:
            keys, values = torch.cat([memory[0], keys], 1), torch.cat([memory[1], values], 1)
            k_pos = torch.cat([memory[2], k_pos])
        out.append(attend_one(mixer, q[:, t:t + 1], torch.tensor([t]), keys, values, k_pos))
        if (t + 1) % L == 0:  # chunk c complete: fold it
            m_pos = torch.full((mixer.hp.slots,), t)
            m = mixer.mem_norm(merge_heads(attend_one(mixer, qm, m_pos, keys, values, k_pos)[None]))
            mk, mv = mixer.memory_kv(m)
            memory = (mk[0], mv[0], m_pos)
    if not out:
        return x.new_zeros(0, x.shape[-1])
    av = torch.cat(out, 1)
    return (u * mixer.out_norm(merge_heads(av[None])))[0]


@pytest.mark.parametrize("hp", SETTINGS + [{"chunk": 1, "slots": 2}], ids=IDS + ["c1m2"])
def test_batched_forward_equals_the_plain_recurrence(hp):
    model = tiny_model("rec2pm", hparams=hp, seed=3)
    mixer = model.blocks[0].mixer
    torch.manual_seed(0)
    lengths = torch.tensor([41, 17, 1, 0, 30, 8])
    x = torch.randn(len(lengths), 41, 32)
    valid = torch.arange(41)[None] >= (41 - lengths)[:, None]
    pos = torch.arange(41)[None] - (41 - lengths)[:, None]
    with torch.no_grad():
        y = mixer(x, pos, valid)
        for i, n in enumerate(lengths.tolist()):
            torch.testing.assert_close(y[i, 41 - n:], reference_mixer(mixer, x[i], n),
                                       rtol=0, atol=1e-5)


# -- hyperparameters ---------------------------------------------------------------------
def test_hparams_are_validated():
    for bad in ({"chunk": 0}, {"slots": 0}, {"chunk": 8.0}, {"slots": True},
                {"consistency": -1.0}, {"consistency": float("nan")}, {"consistency": "1"},
                {"consistency": True}, {"window": 8}):
        with pytest.raises(InputError):
            Rec2PM.parse_hparams(bad)
    assert Rec2PM.parse_hparams({}) == Rec2PM.Hparams(chunk=128, slots=4, consistency=1.0)
    assert Rec2PM.parse_hparams({"consistency": 0}).consistency == 0


# -- the degenerate case: nothing folds ----------------------------------------------------
def test_a_chunk_longer_than_the_sequence_is_native_causal_attention():
    """With chunk >= every sequence (the default 128 > 79 tokens) nothing folds: every token
    attends to the raw tokens before it, i.e. Native, with Native's weights (the memory's own
    parameters are the only extra ones), through forward, serving and bytes."""
    native = tiny_model("native", seed=1)
    model = tiny_model("rec2pm", seed=2)
    missing, unexpected = model.load_state_dict(native.state_dict(), strict=False)
    assert not unexpected and missing and all(".mem_" in key for key in missing)
    batch = random_batch(LENGTHS, seed=1)
    torch.testing.assert_close(model.logits(batch), native.logits(batch), rtol=0, atol=1e-5)
    torch.testing.assert_close(serve(model, batch), serve(native, batch), rtol=0, atol=1e-5)
    assert measure_user_bytes(model, 20) == measure_user_bytes(native, 20)
    # the test can fail: with folding chunks the same weights give other scores
    folding = tiny_model("rec2pm", hparams={"chunk": 8, "slots": 4})
    folding.load_state_dict(model.state_dict(), strict=True)
    assert (folding.logits(batch) - native.logits(batch)).abs().max() > 1e-3


# -- what is kept ------------------------------------------------------------------------
@pytest.mark.parametrize("hp", SETTINGS, ids=IDS)
def test_memory_holds_slots_and_the_unfinished_chunk(hp):
    model = tiny_model("rec2pm", hparams=hp, seed=2)
    batch = random_batch(LENGTHS, seed=12)
    memory = model.prefill(*history(batch))
    n_hist = (2 * (batch["lengths"] - 1)).tolist()
    layer = memory.layers[0]
    if hp.get("store_kv"):  # the memory's K,V per head
        assert layer.payload["memory_k"].shape[1:] == (4, hp["slots"], 8)
    else:                   # the memory tokens
        assert layer.payload["memory"].shape[1:] == (hp["slots"], 32)
    slots = layer.metadata["memory_valid"].sum(1).tolist()
    tails = layer.metadata["tail_valid"].sum(1).tolist()
    assert [(s, t) for s, t in zip(slots, tails)] == [Rec2PM.kept(model.hp, n) for n in n_hist]
    assert slots[0] == hp["slots"] and tails[0] < n_hist[0]  # the longest user folded chunks
    # a request changes nothing and candidates are independent (order does not matter)
    before = {k: t.clone() for k, t in layer.payload.items()}
    assert_candidates_independent(model, memory, len(LENGTHS))
    assert all(torch.equal(before[k], layer.payload[k]) for k in before)


def test_memory_size_does_not_grow_with_the_history():
    """Past one chunk, the memory is `slots` tokens whatever the length: histories with the
    same unfinished-chunk length keep the same bytes (8, 24 and 40 tokens at L = 8), and
    the kept bytes only depend on the tail otherwise."""
    hp = {"chunk": 8, "slots": 4}
    model = tiny_model("rec2pm", layers=2, hparams=hp)
    at = {n: measure_user_bytes(model, n) for n in (4, 12, 20, 7, 15)}
    assert at[4] == at[12] == at[20]
    assert at[7] == at[15] != at[4]
    memory = model.prefill(*history(random_batch([21], seed=3)))
    assert memory.layers[0].payload["memory"].shape == (1, 4, 32)
    assert memory.layers[0].payload["tail_k"].shape[2] == 0
    # and it is strictly below Native's, which grows with the history
    native = tiny_model("native", layers=2)
    assert at[20]["with_metadata"] < measure_user_bytes(native, 20)["with_metadata"] / 15


def test_keeping_the_memory_as_kv_changes_bytes_and_macs_not_scores():
    """`store_kv` keeps kv(M) instead of M: the same scores with the same weights, 2·d instead
    of d floats per slot, and no per-request projection of the memory."""
    tokens = tiny_model("rec2pm", layers=2, hparams={"chunk": 8, "slots": 4})
    as_kv = tiny_model("rec2pm", layers=2, hparams={"chunk": 8, "slots": 4, "store_kv": True})
    as_kv.load_state_dict(tokens.state_dict(), strict=True)
    batch = random_batch(LENGTHS, seed=9)
    torch.testing.assert_close(serve(as_kv, batch), serve(tokens, batch), rtol=0, atol=1e-6)
    extra = measure_user_bytes(as_kv, 20)["payload"] - measure_user_bytes(tokens, 20)["payload"]
    assert extra == 2 * 4 * 32 * 4  # layers x slots x d x fp32
    saved = closed_form_macs(tokens, 20)["request_matmul"] - \
        closed_form_macs(as_kv, 20)["request_matmul"]
    assert saved == 2 * 4 * 32 * 64  # layers x slots x d x 2D


# -- appends --------------------------------------------------------------------------------
@pytest.mark.parametrize("hp", SETTINGS, ids=IDS)
@pytest.mark.parametrize("step", [1, 3, 4], ids=["one", "three", "four"])
def test_prefill_then_appends_equal_forward(hp, step):
    """New interactions arrive `step` at a time (4 in all, crossing chunk boundaries, one user
    starting from an empty history; 3 at a time is 3 then 1): the appended items' logits and
    the next request equal the training forward."""
    model = tiny_model("rec2pm", hparams=hp, seed=4)
    batch = random_batch(APPEND_LENGTHS, seed=13)
    full = model.logits(batch)
    delta = 4
    memory = model.prefill(*history(batch, delta + 1))
    logits = []
    for start in range(0, delta, step):
        sl = slice(-delta - 1 + start, -delta - 1 + min(start + step, delta))
        memory, item_logits = model.append(memory, batch["items"][:, sl], batch["labels"][:, sl])
        logits.append(item_logits)
    torch.testing.assert_close(torch.cat(logits, 1), full[:, -delta - 1:-1], rtol=0, atol=1e-5)
    served = model.score(memory, batch["items"][:, -1:])[:, 0]
    torch.testing.assert_close(served, full[:, -1], rtol=0, atol=1e-5)
    # the memory after appends is what a prefill of the same history keeps
    fresh = model.prefill(*history(batch))
    for got, want in zip(memory.layers, fresh.layers):
        valid = want.metadata["memory_valid"]
        assert torch.equal(got.metadata["memory_valid"], valid)
        for key in ("memory_k", "memory_v") if hp.get("store_kv") else ("memory",):
            slots = valid[:, None].expand_as(want.payload[key][..., 0]) if key != "memory" \
                else valid
            torch.testing.assert_close(got.payload[key][slots], want.payload[key][slots],
                                       rtol=0, atol=1e-5)
        assert torch.equal(got.metadata["tail_valid"].sum(1), want.metadata["tail_valid"].sum(1))


# -- MACs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("hp", SETTINGS + [{"chunk": 128, "slots": 4}], ids=IDS + ["c128"])
def test_prefill_and_request_macs_match_flop_counter(hp):
    """Prefill (folds included), one user, and requests, against what torch counts."""
    model = tiny_model("rec2pm", layers=2, hparams=hp)
    for n_history in (3, 5, 16):
        items = torch.randint(1, 50, (1, n_history))
        with FlopCounterMode(display=False) as counter:
            model.prefill(items, torch.randint(0, 2, (1, n_history)), torch.tensor([n_history]))
        per_layer = Rec2PM.macs(model.cfg, model.hp, 2 * n_history)["prefill_matmul"]
        assert counter.get_total_flops() // 2 == 2 * per_layer, n_history
        for q in (1, 3):
            assert flop_counter_macs(model, n_history, q) == \
                closed_form_macs(model, n_history, q)["request_matmul"]


# -- teacher forcing -----------------------------------------------------------------------
def reference_consistency(mixer, k, v, lengths):
    """Per user and completed chunk h >= 1: m_h^ref (queries over chunks <= h) against the
    update from m_{h-1}^ref and chunk h alone, both normalised before LN_m's affine; the mean
    over (user, h) pairs."""
    L, C, h = mixer.hp.chunk, mixer.hp.slots, mixer.cfg.num_heads
    qm = split_heads(F.silu(mixer.mem_q(mixer.mem_emb.weight))[None], h)[0]
    n = k.shape[2]
    errors = []
    for i, n_valid in enumerate(lengths):
        ki, vi = k[i, :, n - n_valid:], v[i, :, n - n_valid:]
        refs = []
        for c in range(n_valid // L):
            end = (c + 1) * L
            m_pos = torch.full((C,), end - 1)
            av = attend_one(mixer, qm, m_pos, ki[:, :end], vi[:, :end], torch.arange(end))
            refs.append(merge_heads(av[None]))  # A·V, before LN_m
            if c == 0:
                continue
            mk, mv = mixer.memory_kv(mixer.mem_norm(refs[c - 1]))
            keys = torch.cat([mk[0], ki[:, c * L:end]], 1)
            values = torch.cat([mv[0], vi[:, c * L:end]], 1)
            k_pos = torch.cat([torch.full((C,), c * L - 1), torch.arange(c * L, end)])
            av = attend_one(mixer, qm, m_pos, keys, values, k_pos)
            tf = merge_heads(av[None])
            errors.append((F.layer_norm(tf, (32,)) - F.layer_norm(refs[c], (32,))).pow(2).mean())
    return torch.stack(errors).mean()


def test_consistency_loss_equals_the_plain_computation_and_trains_without_changing_forward():
    hp = {"chunk": 6, "slots": 2}
    model = tiny_model("rec2pm", hparams=hp, seed=5).train()
    mixer = model.blocks[0].mixer
    torch.manual_seed(0)
    lengths = [41, 17, 5, 30]
    x = torch.randn(len(lengths), 41, 32)
    valid = torch.arange(41)[None] >= (41 - torch.tensor(lengths))[:, None]
    pos = torch.arange(41)[None] - (41 - torch.tensor(lengths))[:, None]
    _, _, k, v = mixer.project(x)
    with torch.no_grad():
        torch.testing.assert_close(mixer.consistency_loss(k, v, pos, valid),
                                   reference_consistency(mixer, k, v, lengths),
                                   rtol=0, atol=1e-6)
    # training forward: the same value with or without the auxiliary loss, other gradients
    batch = random_batch(LENGTHS, seed=7)
    grads, logits = {}, {}
    for lam in (0.0, 1.0):
        twin = tiny_model("rec2pm", hparams={**hp, "consistency": lam}, seed=5).train()
        twin.load_state_dict(model.state_dict(), strict=True)
        logits[lam] = twin.logits(batch)
        twin.loss(batch).backward()
        grads[lam] = twin.blocks[0].mixer.mem_kv.weight.grad.clone()
    assert torch.equal(logits[0.0], logits[1.0])
    assert (grads[1.0] - grads[0.0]).abs().max() > 1e-6
    assert torch.isfinite(grads[1.0]).all()
