"""The blocked attention (model/fast_attention.py) and the relative-bias fast paths against
their plain references, in fp32: values and gradients wrt q, k, v and the bias."""

import pytest
import torch

import malloc_ray.methods.native as native_module
from malloc_ray.methods.native import Native
from malloc_ray.model import fast_attention as fa
from malloc_ray.model.hstu import (HSTUBlock, HSTUConfig, RelativeBias, pointwise_attention,
                                   pointwise_attention_reference, relative_bucket, visibility)

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _fp32_exact():
    """Plain fp32 matmuls (no TF32 / reduced precision), restored afterwards."""
    precision = torch.get_float32_matmul_precision()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(precision)
    torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows and batch chunks of one user, so every loop runs several times."""
    monkeypatch.setattr(fa, "BLOCK_ELEMENTS", 256)
    monkeypatch.setattr(fa, "MIN_ROWS", 4)


def _case(b=3, h=2, nq=21, nk=21, dh=8, bias_shape=None, seed=0, causal=True, hole=False,
          head_mask=False):
    """Left-padded users (row 0 unpadded), causal visibility of the last nq tokens; `hole`:
    one key in the middle invalid for everyone (a column no query sees, inside the range)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, dh, generator=g).requires_grad_()
    k, v = (torch.randn(b, h, nk, dh, generator=g).requires_grad_() for _ in range(2))
    bias = torch.randn(*(bias_shape or (1, h, nq, nk)), generator=g).requires_grad_()
    pos = torch.arange(nk)[None].expand(b, nk)
    pad = torch.tensor([0, 5, nk - 2] + [3] * (b - 3))[:b]
    valid = pos >= pad[:, None]
    if hole:
        valid = valid & (pos != nk - nq // 2)
    same = torch.cat([torch.zeros(nq, nk - nq, dtype=torch.bool),
                      torch.eye(nq, dtype=torch.bool)], 1)
    if causal:
        mask = visibility(pos[:, nk - nq:], pos, valid, same)
    else:
        mask = torch.rand(b, 1, nq, nk, generator=g) > 0.4
    if head_mask:  # a mask per head (pruning methods keep other tokens in every head)
        mask = mask & (torch.rand(b, h, 1, nk, generator=g) > 0.3)
    return q, k, v, bias, mask


def _grads(fn, q, k, v, bias, mask, divisor):
    out = fn(q, k, v, bias, mask, divisor)
    weight = torch.linspace(-1, 1, out.numel()).view_as(out)  # a fixed, non-uniform dL/dout
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v, bias))
    return out, grads


def _assert_matches_reference(q, k, v, bias, mask, divisor=6.0):
    out, grads = _grads(fa.PointwiseAttention.apply, q, k, v, bias, mask, divisor)
    ref, ref_grads = _grads(pointwise_attention_reference, q, k, v, bias, mask, divisor)
    torch.testing.assert_close(out, ref, **TOL)
    for name, got, expected in zip("qkvb", grads, ref_grads):
        torch.testing.assert_close(got, expected, **TOL, msg=lambda m: f"d{name}: {m}")
    return out, grads


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", [
    dict(),                                   # causal, left padding, bias shared by the batch
    dict(nq=6),                               # the last tokens as queries over all keys
    dict(bias_shape=(3, 2, 21, 21)),          # a bias per user
    dict(bias_shape=(1, 1, 21, 21)),          # a bias shared by the heads too
    dict(causal=False),                       # an arbitrary mask
    dict(hole=True),                          # a key nobody sees between seen ones
    dict(hole=True, nq=9),
    dict(b=1, h=3, nq=17, nk=30, seed=3),
    dict(head_mask=True),                     # a mask per head
    dict(dh=16),                              # wider heads
    dict(dh=3, seed=4),
])
def test_blocked_attention_matches_reference(small_blocks, monkeypatch, case, threads):
    monkeypatch.setattr(fa, "THREADS", threads)
    _assert_matches_reference(*_case(**case))


def test_one_block_forward_is_bitwise_the_reference():
    """Short inputs fit one block: every key, the reference's ops and matmul shapes, so other
    methods that redo Native's ops can compare their rows with it exactly."""
    q, k, v, bias, mask = _case(b=4, h=4, nq=40, nk=40, seed=5)
    out, _ = _assert_matches_reference(q, k, v, bias, mask)
    with torch.no_grad():
        torch.testing.assert_close(out, pointwise_attention_reference(q, k, v, bias, mask, 6.0),
                                   rtol=0, atol=0)


def test_padded_rows_get_zero_output_and_gradient(small_blocks):
    q, k, v, bias, mask = _case(seed=1)
    out, (dq, dk, dv, dbias) = _assert_matches_reference(q, k, v, bias, mask)
    hidden = ~mask.any(-1)[:, 0]                  # (B, Nq): query rows that see nothing
    assert hidden.any()
    assert torch.equal(out.detach().transpose(1, 2)[hidden], torch.zeros_like(
        out.detach().transpose(1, 2)[hidden]))
    assert (dq.transpose(1, 2)[hidden] == 0).all()
    unseen = ~mask.any(-2)[:, 0]                  # (B, Nk): keys nobody sees
    assert (dk.transpose(1, 2)[unseen] == 0).all() and (dv.transpose(1, 2)[unseen] == 0).all()


def test_backward_recomputes_instead_of_saving_scores():
    q, k, v, bias, mask = _case(b=2, h=2, nq=32, nk=32)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fa.PointwiseAttention.apply(q, k, v, bias, mask, 4.0)
    scores = 2 * 2 * 32 * 32
    # what it keeps: q, k, v, the bias and the mask it was given; no (B, H, Nq, Nk) intermediate
    assert sorted(saved) == sorted([q.numel(), k.numel(), v.numel(), bias.numel(), mask.numel()])
    assert max(saved) < scores


def test_pointwise_attention_dispatch(monkeypatch):
    # training: the blocked autograd function, equal to the reference to rounding
    q, k, v, bias, mask = _case(seed=2)
    out, grads = _grads(pointwise_attention, q, k, v, bias, mask, 5.0)
    ref, ref_grads = _grads(pointwise_attention_reference, q, k, v, bias, mask, 5.0)
    assert out.grad_fn is not None and "PointwiseAttention" in type(out.grad_fn).__name__
    torch.testing.assert_close(out, ref, **TOL)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, **TOL)
    # no grad, long inputs: the blocked forward; short inputs stay bitwise the reference
    monkeypatch.setattr(fa, "BLOCK_ELEMENTS", 256)
    with torch.no_grad():
        expected = pointwise_attention_reference(q, k, v, bias, mask, 5.0)
        torch.testing.assert_close(pointwise_attention(q, k, v, bias, mask, 5.0), expected,
                                   rtol=0, atol=0)
        monkeypatch.setattr("malloc_ray.model.hstu.BLOCKED_MIN_PAIRS", 1)
        torch.testing.assert_close(pointwise_attention(q, k, v, bias, mask, 5.0), expected, **TOL)
    # shapes the blocked path does not take fall back to the reference
    float_mask = mask.float()
    out = pointwise_attention(q, k, v, bias, float_mask, 5.0)
    torch.testing.assert_close(out, pointwise_attention_reference(q, k, v, bias, float_mask, 5.0),
                               rtol=0, atol=0)


def test_blocked_forward_without_grad_matches_reference(small_blocks, monkeypatch):
    for threads in (1, 2):
        monkeypatch.setattr(fa, "THREADS", threads)
        q, k, v, bias, mask = _case(seed=4, nq=9)
        with torch.inference_mode():
            got = fa.pointwise_attention_fast(q, k, v, bias, mask, 3.0)
            torch.testing.assert_close(
                got, pointwise_attention_reference(q, k, v, bias, mask, 3.0), **TOL)


def _bias_row_by_row(rab, q_pos, k_pos):
    dist = q_pos[:, :, None].long() - k_pos[:, None, :].long()
    return rab.table(relative_bucket(dist, rab.num_buckets, rab.max_distance)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("skew_rows", [3, 128])
def test_relative_bias_paths_match_bucketing_every_pair(monkeypatch, skew_rows):
    monkeypatch.setattr(fa, "SKEW_ROWS", skew_rows)
    torch.manual_seed(0)
    rab = RelativeBias(num_heads=3, num_buckets=8, max_distance=12)
    base = torch.arange(30)
    cases = [
        (base[None], base[None]),                                  # consecutive: Toeplitz path
        (base[None, -4:], base[None]),                             # last queries over all keys
        (torch.arange(5, 25)[None], torch.arange(0, 9)[None]),     # an offset, Nq > Nk
        (torch.stack([base, base + 4]), torch.stack([base, base + 4])),  # left padding shift
        (torch.stack([base, base * 2]), torch.stack([base, base])),      # general gather path
        (base[None, ::2], base[None, ::2]),                        # not consecutive
    ]
    for q_pos, k_pos in cases:
        got = rab(q_pos, k_pos)
        expected = _bias_row_by_row(rab, q_pos, k_pos)
        torch.testing.assert_close(got.expand_as(expected), expected, rtol=0, atol=0)
        weight = torch.randn(expected.shape)
        grad, = torch.autograd.grad((got * weight).sum(), rab.table.weight)
        ref, = torch.autograd.grad((expected * weight).sum(), rab.table.weight)
        torch.testing.assert_close(grad, ref, **TOL)


def test_hstu_block_training_matches_reference_attention(monkeypatch):
    """One Native layer, left-padded users, fwd + bwd: every parameter's gradient and the
    input's equal those with the attention forced onto the reference."""
    monkeypatch.setattr(fa, "BLOCK_ELEMENTS", 512)
    monkeypatch.setattr(fa, "MIN_ROWS", 4)
    cfg = HSTUConfig(d_model=16, num_heads=2, num_layers=1, max_len=20, dropout=0.0)
    torch.manual_seed(0)
    block = HSTUBlock(cfg, Native(cfg)).train()
    n = 2 * cfg.max_len
    x = torch.randn(3, n, cfg.d_model, requires_grad=True)
    pad = torch.tensor([0, 7, 30])
    pos = (torch.arange(n)[None] - pad[:, None]).clamp(min=0)
    valid = torch.arange(n)[None] >= pad[:, None]

    def run():
        block.zero_grad(set_to_none=True)
        out = block(x, pos, valid)
        grads = torch.autograd.grad((out * torch.cos(out)).sum(), [x, *block.parameters()])
        return out, grads

    out, grads = run()
    monkeypatch.setattr(native_module, "pointwise_attention", pointwise_attention_reference)
    ref, ref_grads = run()
    torch.testing.assert_close(out, ref, **TOL)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, **TOL)
