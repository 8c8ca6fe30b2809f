"""The inference fast paths of `model/hstu.py` against their plain references (fp32)."""

import torch

from malloc_ray.model.hstu import (RelativeBias, pointwise_attention,
                                   pointwise_attention_reference, relative_bucket)


def _inputs(b=3, h=2, nq=5, nk=7, dh=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, dh, generator=g) for n in (nq, nk, nk))
    bias = torch.randn(1, h, nq, nk, generator=g)  # broadcast over the batch, as RelativeBias gives
    mask = torch.rand(b, 1, nq, nk, generator=g) > 0.3
    return q, k, v, bias, mask


def test_inference_attention_is_bitwise_the_reference():
    q, k, v, bias, mask = _inputs()
    expected = pointwise_attention_reference(q, k, v, bias, mask, 7.0)
    with torch.no_grad():
        fast = pointwise_attention(q, k, v, bias, mask, 7.0)
    torch.testing.assert_close(fast, expected, rtol=0, atol=0)  # same ops, same order
    # masked keys contribute nothing: changing their values leaves the output alone
    v2 = torch.where(mask.any(2, keepdim=True).transpose(-1, -2).expand_as(v), v, v + 100)
    with torch.no_grad():
        torch.testing.assert_close(pointwise_attention(q, k, v2, bias, mask, 7.0), fast)


def test_attention_keeps_autograd_and_leaves_inputs_alone():
    q, k, v, bias, mask = _inputs(seed=1)
    q.requires_grad_(True)
    before = [t.detach().clone() for t in (q, k, v, bias)]
    out = pointwise_attention(q, k, v, bias, mask, 3.0)
    out.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    ref_q = before[0].clone().requires_grad_(True)
    pointwise_attention_reference(ref_q, k, v, bias, mask, 3.0).sum().backward()
    torch.testing.assert_close(q.grad, ref_q.grad)
    for t, b in zip((q, k, v, bias), before):
        assert torch.equal(t.detach(), b)


def test_inference_attention_falls_back_when_bias_has_a_larger_batch():
    q, k, v, _, mask = _inputs(b=1, seed=2)
    bias = torch.randn(3, 2, 5, 7)  # broadcasting grows the scores: no in-place buffer for it
    with torch.no_grad():
        out = pointwise_attention(q, k, v, bias, mask, 2.0)
    torch.testing.assert_close(out, pointwise_attention_reference(q, k, v, bias, mask, 2.0))
    assert out.shape == (3, 2, 5, 4)


def _bias_row_by_row(rab, q_pos, k_pos):
    dist = q_pos[:, :, None].long() - k_pos[:, None, :].long()
    return rab.table(relative_bucket(dist, rab.num_buckets, rab.max_distance)).permute(0, 3, 1, 2)


def test_relative_bias_shortcut_equals_row_by_row_gather():
    torch.manual_seed(0)
    rab = RelativeBias(num_heads=3, num_buckets=8, max_distance=40)
    base = torch.arange(0, 20)
    shifted = torch.stack([base, base + 4, base - 3])  # left padding: one offset per row
    for q_pos, k_pos in [(shifted, shifted),
                         (shifted[:, -2:], shifted),  # queries of a request, keys of the history
                         (shifted, torch.stack([base, base + 4, base - 2])),  # key row 2 differs
                         (torch.stack([base, base * 2, base]), shifted)]:  # not a shift at all
        got = rab(q_pos, k_pos)
        expected = _bias_row_by_row(rab, q_pos, k_pos)
        torch.testing.assert_close(got.expand_as(expected), expected, rtol=0, atol=0)
    assert rab(shifted, shifted).shape[0] == 1  # the shortcut was taken where rows agree
    assert rab(shifted, torch.stack([base, base + 4, base - 2])).shape[0] == 3
