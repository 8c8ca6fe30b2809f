"""The selective SSM mixer (docs/methods/ssm.md). fp32, dropout 0.

The registry-driven contract tests (tests/test_method_contract.py) check leakage, serving =
forward (alone and in a slate), bytes and request MACs at `SelectiveSSM.test_settings`. Here:
the scans agree with the recurrence, serving (prefill, append, requests) agrees with forward,
the state's size does not depend on the history, and the holographic binding op.
"""

import copy

import pytest
import torch

from malloc_ray.errors import InputError
from malloc_ray.methods.ssm import (HolographicBinding, SelectiveSSM, circular_convolution,
                                    circular_convolution_reference, scan, scan_reference)
from malloc_ray.metrics.cost import measure_user_bytes
# one_thread is an autouse fixture: importing it applies it here
from model_fixtures import (history, one_thread,  # noqa: F401
                            random_batch, tiny_model)

LENGTHS = [21, 8, 5, 1, 13, 17]
APPEND_LENGTHS = [21, 8, 5, 13, 17, 10]  # 5: an empty history after dropping 5
SETTINGS = [s.hparams for s in SelectiveSSM.test_settings] + [{"d_conv": 1, "d_state": 8}]
IDS = ["default", "e2k4n8", "noconv"]


def lively(model):
    """Spread the step sizes and decays (some channels forget within a token, some barely
    at all) and make B, C, D and the conv sizeable, so that the state really carries the
    history and differences between paths show."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in model.blocks:
            m = block.mixer
            m.dt_proj.bias.copy_(torch.empty_like(m.dt_proj.bias).uniform_(-4, 1, generator=g))
            m.A_log.add_(torch.empty_like(m.A_log).uniform_(-3, 1, generator=g))
            m.x_proj.weight.mul_(4)
            m.D.normal_(0, 1, generator=g)
    return model


def test_hparams_are_validated():
    assert SelectiveSSM.parse_hparams({}) == SelectiveSSM.Hparams(16, 1, 2, 0)
    for bad in ({"d_state": 0}, {"expand": True}, {"d_conv": 2.0}, {"dt_rank": -1},
                {"holographic": True}):
        with pytest.raises(InputError):
            SelectiveSSM.parse_hparams(bad)


def test_fast_scan_equals_reference_scan_and_its_gradients():
    """`scan` (hand-written backward) = the plain autograd loop, states and gradients, with
    decays from ~0 (underflowing) to ~1, for T = 1 and longer (T = 0: empty); gradcheck
    in fp64."""
    g = torch.Generator().manual_seed(0)
    assert scan(torch.rand(3, 0, 5, 4), torch.rand(3, 0, 5, 4)).shape == (3, 0, 5, 4)
    for T in (1, 2, 7, 41):
        dA = torch.rand(3, T, 5, 4, generator=g) ** torch.tensor([0.01, 1.0, 30.0, 1e4])
        dBu = torch.randn(3, T, 5, 4, generator=g)
        weight = torch.randn(3, T, 5, 4, generator=g)
        grads = []
        for fn in (scan, scan_reference):
            a, b = dA.clone().requires_grad_(), dBu.clone().requires_grad_()
            h = fn(a, b)
            (h * weight).sum().backward()
            grads.append((h.detach(), a.grad, b.grad))
        for fast, ref in zip(*grads):
            torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-5)
    a = torch.rand(2, 6, 3, 2, dtype=torch.double, requires_grad=True)
    b = torch.randn(2, 6, 3, 2, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(scan, (a, b))


@pytest.mark.parametrize("hp", SETTINGS, ids=IDS)
def test_forward_equals_step_by_step_recurrence(hp):
    """The training/prefill path (all tokens at once, `scan`) equals stepping the serving
    recurrence one token at a time from the empty state: outputs of valid tokens and the
    final state (h and the conv window), with left padding, an all-padding row and a
    one-token row."""
    mixer = lively(tiny_model("ssm", hparams=hp)).blocks[0].mixer
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([41, 17, 0, 1, 30])
    x = torch.randn(5, 41, 32, generator=g) * 2
    valid = torch.arange(41)[None] >= (41 - lengths)[:, None]
    with torch.no_grad():
        y_full, (h_full, w_full) = mixer.run(x, valid)
        y_rec, (h_rec, w_rec) = mixer.forward_recurrent(x, valid)
        y_ref, (h_ref, _) = mixer.run(x, valid, reference=True)
    assert y_full.abs().max() > 0.1 and h_full.abs().max() > 0.1  # not a trivially zero state
    torch.testing.assert_close(y_full[valid], y_rec[valid], rtol=0, atol=1e-5)
    torch.testing.assert_close(h_full, h_rec, rtol=0, atol=1e-5)
    torch.testing.assert_close(w_full, w_rec, rtol=0, atol=0)
    torch.testing.assert_close(y_full, y_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(h_full, h_ref, rtol=0, atol=1e-5)
    assert (h_full[2] == 0).all() and (w_full[2] == 0).all()  # no history: the empty state
    # the state carries the history: the first token of the longest row moves its last output
    x2 = x.clone()
    x2[0, 0] += 1
    with torch.no_grad():
        assert (mixer.run(x2, valid)[0][0, -1] - y_full[0, -1]).abs().max() > 1e-4


def test_long_sequence_stays_finite_and_close_to_fp64():
    """2046 tokens (the kuaivideo history) with large inputs: finite, and the fp32 forward
    within 1e-4 (absolute and relative) of the reference recurrence in fp64. Slowly
    decaying channels sum ~2000 terms and outputs reach ~1e3, so fp32 rounding alone is
    ~1e-4 there; the error does not compound beyond that."""
    mixer = lively(tiny_model("ssm", layers=1)).blocks[0].mixer
    x = torch.randn(1, 2046, 32, generator=torch.Generator().manual_seed(2)) * 4
    valid = torch.ones(1, 2046, dtype=torch.bool)
    with torch.no_grad():
        y, _ = mixer.run(x, valid)
        y64, _ = copy.deepcopy(mixer).double().run(x.double(), valid, reference=True)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), y64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hp", SETTINGS, ids=IDS)
def test_prefill_append_then_score_equal_forward(hp):
    """Prefill (all tokens at once) then append (recurrent) then score equals the forward:
    the appended items' logits as served before their labels, and the next target; a request
    commits nothing and each candidate of a slate is stepped from the same state."""
    model = lively(tiny_model("ssm", seed=5, hparams=hp))
    batch = random_batch(APPEND_LENGTHS, seed=14)
    with torch.no_grad():
        full = model.logits(batch)
    delta = 4
    memory = model.prefill(*history(batch, delta + 1))
    memory, item_logits = model.append(memory, batch["items"][:, -delta - 1:-1],
                                       batch["labels"][:, -delta - 1:-1])
    torch.testing.assert_close(item_logits, full[:, -delta - 1:-1], rtol=0, atol=1e-5)
    served = model.score(memory, batch["items"][:, -1:])[:, 0]
    torch.testing.assert_close(served, full[:, -1], rtol=0, atol=1e-5)
    assert (full[:, -1] - full[:, -2]).abs().max() > 1e-3  # the logits differ: a real check
    # a request commits nothing; a slate's candidates are independent of each other
    before = [dict(m.payload) for m in memory.layers]
    cands = torch.cat([torch.tensor([[3, 7]] * len(APPEND_LENGTHS)), batch["items"][:, -1:]], 1)
    several = model.score(memory, cands)
    for old, layer in zip(before, memory.layers):
        assert all(layer.payload[k] is old[k] for k in old)
    alone = torch.stack([model.score(memory, cands[:, i:i + 1])[:, 0] for i in range(3)], 1)
    torch.testing.assert_close(several, alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(several[:, 2], full[:, -1], rtol=0, atol=1e-5)


def test_append_one_at_a_time_equals_one_append_and_a_fresh_prefill():
    """Appending interactions one by one or all at once gives the same state as prefilling
    the longer history directly."""
    model = lively(tiny_model("ssm", seed=6))
    batch = random_batch(APPEND_LENGTHS, seed=15)
    fresh = model.prefill(*history(batch, 1))
    step = model.prefill(*history(batch, 4))
    for t in range(-4, -1):
        step, _ = model.append(step, batch["items"][:, t:t + 1], batch["labels"][:, t:t + 1])
    for a, b in zip(fresh.layers, step.layers):
        torch.testing.assert_close(a.payload["h"], b.payload["h"], rtol=0, atol=1e-5)
        torch.testing.assert_close(a.payload["conv"], b.payload["conv"], rtol=0, atol=1e-6)
    torch.testing.assert_close(fresh.next_pos, step.next_pos)


@pytest.mark.parametrize("hp", SETTINGS, ids=IDS)
def test_bytes_do_not_grow_with_the_history(hp):
    """One user's memory is the same at 1 and 1023 interactions (and equals the formula),
    while Native's grows; the kept tensors have the documented shapes."""
    model = tiny_model("ssm", layers=2, hparams=hp)
    d, E, N, K, _ = SelectiveSSM.dims(model.cfg, model.hp)
    sizes = {n: measure_user_bytes(model, n) for n in (1, 1023)}
    expected = 2 * (E * N + (K - 1) * E) * 4
    assert all(s == {"payload": expected, "with_metadata": expected} for s in sizes.values())
    native = measure_user_bytes(tiny_model("native", layers=2), 1023)["with_metadata"]
    assert expected * 100 < native  # the compression a long history buys
    assert SelectiveSSM.memory_bytes(model.cfg, model.hp, 10 ** 6, True) == expected // 2
    layer = model.prefill(*history(random_batch([9, 3]), 1)).layers[0]
    assert layer.payload["h"].shape == (2, E, N) and layer.payload["conv"].shape == (2, K - 1, E)
    assert not layer.metadata


def test_request_cost_is_independent_of_the_history():
    model = tiny_model("ssm")
    small, large = (SelectiveSSM.macs(model.cfg, model.hp, n, 3) for n in (2, 2 * 1023))
    assert small["request"] == large["request"]
    assert small["request_matmul"] == large["request_matmul"]
    assert large["prefill"] == 1023 * SelectiveSSM.macs(model.cfg, model.hp, 2, 1)["prefill"]


# -- holographic binding ------------------------------------------------------------------
def test_circular_convolution_fft_equals_the_sum():
    g = torch.Generator().manual_seed(4)
    for d in (1, 8, 31, 32):
        x, y = torch.randn(3, 5, d, generator=g), torch.randn(3, 5, d, generator=g)
        torch.testing.assert_close(circular_convolution(x, y),
                                   circular_convolution_reference(x, y), rtol=0, atol=1e-5)
    delta = torch.zeros(8)
    delta[0] = 1  # the identity of ⊛
    x = torch.randn(8, generator=g)
    torch.testing.assert_close(circular_convolution(x, delta), x, rtol=0, atol=1e-6)


def test_holographic_binding_keeps_width_and_uses_the_synthetic_category_map():
    import numpy as np

    from malloc_ray.data.sources.synthetic import item_category

    torch.manual_seed(0)
    bind = HolographicBinding(d_model=16, categories=5)
    items = torch.tensor([[0, 1, 5, 6, 12]])
    assert bind.category(items[:, 1:]).tolist() == [item_category(np.array([1, 5, 6, 12]), 5)
                                                   .tolist()]
    emb = torch.randn(1, 5, 16)
    out = bind(items, emb)
    assert out.shape == emb.shape and (out[0, 0] == 0).all()  # padding stays zero
    # same item embedding, different category -> different bound vectors; same category -> same
    same = bind(torch.tensor([[1, 6, 2]]), emb[:, :1].expand(1, 3, 16))
    torch.testing.assert_close(same[0, 0], same[0, 1])
    assert (same[0, 0] - same[0, 2]).abs().max() > 1e-3
    with pytest.raises(ValueError):
        HolographicBinding(16, categories=0)
