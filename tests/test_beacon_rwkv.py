"""Activation Beacon and RWKV (docs/methods/). fp32, dropout 0.

Beacon's default window (128 tokens) is longer than the tiny model's windows (<= 79 tokens),
so it declares test settings with windows of 6-8 (`Beacon.test_settings`); the registry-driven
contract tests (tests/test_method_contract.py) check leakage, serving = forward, bytes and
request MACs there. The tests here check what is Beacon's own, and ratio 1 (as many kept
tokens as Native, so not a compressing setting the contract could run).
"""

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import malloc_ray.methods.beacon  # noqa: F401  (registers beacon until methods/__init__ does)
import malloc_ray.methods.rwkv  # noqa: F401  (registers rwkv)
from malloc_ray.errors import InputError
from malloc_ray.methods.beacon import Beacon, read_mask, window_of
from malloc_ray.methods.rwkv import RWKV
from malloc_ray.metrics.cost import closed_form_macs, flop_counter_macs, measure_user_bytes
# one_thread is an autouse fixture: importing it applies it here
from model_fixtures import (assert_candidates_independent, history,  # noqa: F401
                            one_thread,
                            random_batch, serve, tiny_model)

# target positions 2(l-1): 40 (a window boundary for W = 4, 5, 8), 14, 8, 6, 24, 32
LENGTHS = [21, 8, 5, 4, 13, 17]
APPEND_LENGTHS = [21, 8, 5, 13, 17, 10]  # 5: an empty history after dropping 5
RATIO_1 = {"window": 4, "ratio": 1}  # learned beacons, one per raw token: condenses nothing
RAW = {"window": 4, "ratio": 1, "raw_beacons": True}
# (id, hparams): the declared settings plus ratio 1 with learned beacons, then raw ones too
LEARNED = [(s.id, s.hparams) for s in Beacon.test_settings] + [("w4r1", RATIO_1)]
ALL = LEARNED + [("raw", RAW)]


def flip_probe(model, batch):
    """Flip each label in turn; the logit of i_t and every earlier item must not move."""
    base = model.logits(batch).detach()
    s = batch["items"].shape[1]
    for t in range(s):
        changed = {**batch, "labels": batch["labels"].clone()}
        changed["labels"][:, t] = 1 - changed["labels"][:, t]
        after = model.logits(changed).detach()
        torch.testing.assert_close(after[:, : t + 1], base[:, : t + 1], rtol=0, atol=0)
        if t < s - 1:  # the probe can fail: later items do see y_t
            assert (after[:, t + 1:] - base[:, t + 1:]).abs().max() > 0


# -- Beacon ------------------------------------------------------------------------------
def test_beacon_hparams_are_validated():
    for bad in ({"window": 8, "ratio": 3}, {"window": 0}, {"ratio": 2, "raw_beacons": True},
                {"window": 8.0}, {"raw_beacons": 1}):
        with pytest.raises(InputError):
            Beacon.parse_hparams(bad)
    assert Beacon.parse_hparams({}) == Beacon.Hparams(window=128, ratio=8, raw_beacons=False)


@pytest.mark.parametrize("window", [4, 5, 8])
def test_beacon_raw_activations_with_ratio_1_equal_native(window):
    """The reference's beacon_size=-1 path: full windows keep their raw K,V. Same parameters
    as Native (strict load), and the same scores, through forward and through serving."""
    native = tiny_model("native", seed=1)
    raw = tiny_model("beacon", hparams={"window": window, "ratio": 1, "raw_beacons": True})
    raw.load_state_dict(native.state_dict(), strict=True)
    batch = random_batch(LENGTHS, seed=1)
    torch.testing.assert_close(raw.logits(batch), native.logits(batch), rtol=0, atol=1e-5)
    torch.testing.assert_close(serve(raw, batch), serve(native, batch), rtol=0, atol=1e-5)
    assert measure_user_bytes(raw, 20) == measure_user_bytes(native, 20)
    # the test can fail: learned beacons (same shared weights) give other scores
    learned = tiny_model("beacon", hparams={"window": window, "ratio": 1})
    learned.load_state_dict(native.state_dict(), strict=False)
    assert (learned.logits(batch) - native.logits(batch)).abs().max() > 1e-3


def test_read_mask_never_shows_a_raw_token_its_own_windows_beacons():
    W, ratio, b = 8, 2, 3
    q_pos = torch.tensor([[-3, 0, 5, 7, 8, 15, 16, 30]] * b)
    n_win = 4
    slot = (torch.arange(W // ratio) + 1) * ratio - 1
    b_pos = (torch.arange(n_win)[:, None] * W + slot).flatten()[None].expand(b, -1)
    b_valid = torch.ones_like(b_pos, dtype=torch.bool)
    b_valid[1, -4:] = False  # an unfinished window in a batch: never visible
    r_pos = torch.arange(-2, 32)[None].expand(b, -1)
    r_valid = r_pos >= 0
    n_q, n_r = q_pos.shape[1], r_pos.shape[1]
    same = torch.zeros(n_q, n_r, dtype=torch.bool)
    mask = read_mask(q_pos, b_pos, b_valid, r_pos, r_valid, same, W)[:, 0]
    see_b, see_r = mask[..., : b_pos.shape[1]], mask[..., b_pos.shape[1]:]
    q_win = window_of(q_pos, W)[:, :, None]
    assert not (see_b & (window_of(b_pos, W)[:, None, :] >= q_win)).any()
    # and it does show every valid beacon of earlier windows (e.g. position 30 sees 0..2)
    assert see_b.equal(b_valid[:, None, :] & (window_of(b_pos, W)[:, None, :] < q_win))
    assert see_b[0, -1].sum() == 3 * (W // ratio) and see_b[1, -1].sum() == 3 * (W // ratio)
    # raw tokens: own window, strictly earlier, valid only
    assert see_r.equal(r_valid[:, None, :] & (r_pos[:, None, :] < q_pos[:, :, None])
                       & (window_of(r_pos, W)[:, None, :] == q_win))


def test_beacon_ratio_1_no_label_leakage_and_serving_equals_forward():
    """The contract tests' leakage probe and serving = forward, for learned beacons at ratio 1
    (one beacon per raw token, so as many bytes as Native: not a declared setting)."""
    model = tiny_model("beacon", hparams=RATIO_1, seed=2)
    flip_probe(model, random_batch(LENGTHS, seed=11))
    batch = random_batch(LENGTHS, seed=12)
    torch.testing.assert_close(serve(model, batch), model.logits(batch)[:, -1], rtol=0,
                               atol=1e-5)


@pytest.mark.parametrize("hp", [hp for _, hp in LEARNED], ids=[i for i, _ in LEARNED])
def test_beacon_memory_holds_beacons_and_the_unfinished_window(hp):
    model = tiny_model("beacon", hparams=hp, seed=2)
    batch = random_batch(LENGTHS, seed=12)
    # the memory is condensed: beacons of full windows plus the unfinished window
    memory = model.prefill(*history(batch))
    n_hist = 2 * (batch["lengths"] - 1)
    meta = memory.layers[0].metadata
    beacons = [int(meta["beacon_valid"][i].sum()) for i in range(len(n_hist))]
    kept = [b + int(meta["tail_valid"][i].sum()) for i, b in enumerate(beacons)]
    assert kept == [Beacon.kept_tokens(model.hp, int(n)) for n in n_hist]
    assert beacons[0] > 0  # the longest user's history filled windows: beacons are stored
    if hp["ratio"] > 1:  # the declared settings: fewer kept tokens than history tokens
        assert kept[0] < n_hist[0]
    # candidates: each sees the history and itself only (order does not matter)
    assert_candidates_independent(model, memory, len(LENGTHS))


@pytest.mark.parametrize("hp", [{"window": 4, "ratio": 2}, {"window": 6, "ratio": 3}],
                         ids=["w4r2", "w6r3"])
def test_beacon_prefill_then_append_equals_forward(hp):
    """Appends fill the unfinished window and condense it when full (δ = 4 interactions cross
    window boundaries); the appended items' logits and the next request equal forward."""
    model = tiny_model("beacon", hparams=hp, seed=4)
    batch = random_batch(APPEND_LENGTHS, seed=13)
    full = model.logits(batch)
    delta = 4
    memory = model.prefill(*history(batch, delta + 1))
    new_items = batch["items"][:, -delta - 1:-1]
    memory, item_logits = model.append(memory, new_items, batch["labels"][:, -delta - 1:-1])
    torch.testing.assert_close(item_logits, full[:, -delta - 1:-1], rtol=0, atol=1e-5)
    served = model.score(memory, batch["items"][:, -1:])[:, 0]
    torch.testing.assert_close(served, full[:, -1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("hp", [RATIO_1, RAW], ids=["w4r1", "raw"])
def test_beacon_ratio_1_bytes_and_request_macs_match_measurement(hp):
    """The contract tests' bytes and MACs checks at ratio 1 (not a declared setting)."""
    model = tiny_model("beacon", layers=2, hparams=hp)
    for n_history in (3, 4, 17):
        measured = measure_user_bytes(model, n_history)
        for metadata, key in ((False, "payload"), (True, "with_metadata")):
            assert measured[key] == 2 * Beacon.memory_bytes(model.cfg, model.hp, 2 * n_history,
                                                            metadata)
    for n_history, q in ((5, 1), (16, 3)):
        assert flop_counter_macs(model, n_history, q) == \
            closed_form_macs(model, n_history, q)["request_matmul"]


@pytest.mark.parametrize("hp", [hp for _, hp in ALL], ids=[i for i, _ in ALL])
def test_beacon_prefill_macs_match_flop_counter(hp):
    """Prefill (condensation included), one user, against what torch counts."""
    model = tiny_model("beacon", layers=2, hparams=hp)
    for n_history in (5, 16):
        items = torch.randint(1, 50, (1, n_history))
        with FlopCounterMode(display=False) as counter:
            model.prefill(items, torch.randint(0, 2, (1, n_history)), torch.tensor([n_history]))
        per_layer = Beacon.macs(model.cfg, model.hp, 2 * n_history)["prefill_matmul"]
        assert counter.get_total_flops() // 2 == 2 * per_layer


# -- RWKV --------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 5, 32])
def test_rwkv_parallel_forward_equals_recurrence(chunk):
    """Chunked parallel WKV (any chunk length) equals model_run.py's step-by-step recurrence,
    with left padding skipped; outputs and the final state."""
    torch.manual_seed(0)
    model = tiny_model("rwkv")
    mixer = model.blocks[0].mixer
    mixer.chunk = chunk
    with torch.no_grad():  # spread the decays (some fast, some ~no decay) and the bonus
        mixer.time_decay.uniform_(-6, 2.5)
        mixer.time_first.normal_(0, 1)
    lengths = torch.tensor([41, 17, 1, 30])
    x = torch.randn(4, 41, 32) * 2
    valid = torch.arange(41)[None] >= (41 - lengths)[:, None]
    pos = torch.arange(41)[None] - (41 - lengths)[:, None]
    y_par, state_par = mixer.run(x, valid)
    y_rec, state_rec = mixer.forward_recurrent(x, valid)
    torch.testing.assert_close(y_par[valid], y_rec[valid], rtol=0, atol=1e-5)
    assert torch.isfinite(y_par).all()
    torch.testing.assert_close(state_par[0], state_rec[0], rtol=0, atol=0)
    for num in (1, 2):  # aa, bb are scaled by exp(-pp); compare exp(pp)-free ratios
        scale = torch.exp(state_par[3] - state_rec[3])
        torch.testing.assert_close(state_par[num] * scale, state_rec[num], rtol=1e-5, atol=1e-6)
    # the state carries information: the first token of a long row moves its last output
    x2 = x.clone()
    x2[0, 0] += 1
    assert (mixer.forward(x2, pos, valid)[0, -1] - y_par[0, -1]).abs().max() > 1e-4


def test_rwkv_long_sequence_stays_finite_and_exact():
    """600 tokens, large inputs, decays from ~0 to e^3 per step: the chunked fp32 form stays
    within 1e-5 of the recurrence run in fp64 (the fp32 recurrence itself drifts ~1.5e-5
    here, so fp64 is the reference)."""
    torch.manual_seed(1)
    model = tiny_model("rwkv", layers=1)
    mixer = model.blocks[0].mixer
    with torch.no_grad():
        mixer.time_decay.uniform_(-8, 3)
    x = torch.randn(1, 600, 32) * 4
    valid = torch.ones(1, 600, dtype=torch.bool)
    with torch.no_grad():
        y_par, _ = mixer.run(x, valid)
        y_64, _ = copy.deepcopy(mixer).double().forward_recurrent(x.double(), valid)
    assert torch.isfinite(y_par).all()
    torch.testing.assert_close(y_par.double(), y_64, rtol=0, atol=1e-5)


def test_rwkv_serving_prefill_append_request_equal_forward():
    """Prefill runs the parallel form, append and requests the recurrence: the appended items'
    logits and the request equal the full forward; a request commits nothing and each
    candidate steps from the same state."""
    model = tiny_model("rwkv", seed=5)
    batch = random_batch(LENGTHS, seed=14)
    full = model.logits(batch)
    torch.testing.assert_close(serve(model, batch), full[:, -1], rtol=0, atol=1e-5)
    delta = 3
    memory = model.prefill(*history(batch, delta + 1))
    memory, item_logits = model.append(memory, batch["items"][:, -delta - 1:-1],
                                       batch["labels"][:, -delta - 1:-1])
    torch.testing.assert_close(item_logits, full[:, -delta - 1:-1], rtol=0, atol=1e-5)
    before = [dict(m.payload) for m in memory.layers]
    cands = torch.tensor([[3, 7, 11]] * len(LENGTHS))
    several = model.score(memory, cands)
    for old, layer in zip(before, memory.layers):
        assert all(layer.payload[k] is old[k] for k in old)  # not committed
    alone = torch.stack([model.score(memory, cands[:, i:i + 1])[:, 0] for i in range(3)], 1)
    torch.testing.assert_close(several, alone, rtol=0, atol=1e-6)
    served = model.score(memory, batch["items"][:, -1:])[:, 0]
    torch.testing.assert_close(served, full[:, -1], rtol=0, atol=1e-5)


def test_rwkv_bytes_constant_in_history_length():
    model = tiny_model("rwkv", layers=2)
    sizes = {n: measure_user_bytes(model, n)["with_metadata"] for n in (1, 5, 39)}
    assert set(sizes.values()) == {2 * 4 * 32 * 4}
    assert RWKV.memory_bytes(model.cfg, model.hp, 10 ** 6) == 4 * 32 * 4

