"""The shared method glue (malloc_ray/methods/common/): each helper against
`hstu.pointwise_attention_reference` or a formula written out here independently."""

import pytest
import torch
from torch import nn

from malloc_ray.methods import get_method
from malloc_ray.methods.common.chunks import previous_chunks, target_rows
from malloc_ray.methods.common.glue import (check_bool, check_int, hstu_layers, join_cached,
                                            layer_macs, macs_dict, pair_macs, pointwise_weights,
                                            self_mask, token_macs, token_memory)
from malloc_ray.model.hstu import (HSTUConfig, RelativeBias, pointwise_attention_reference,
                                   visibility)

CFG = HSTUConfig(d_model=32, num_heads=4, num_layers=2, max_len=40, dropout=0.0)


def attention_inputs(seed=0):
    """q (2, 4, 5, 8), k and v (2, 4, 7, 8), bias (2, 4, 5, 7), a bool mask (2, 1, 5, 7)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (2, 4, 5, 8), "k": (2, 4, 7, 8), "v": (2, 4, 7, 8), "bias": (2, 4, 5, 7)}
    t = {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}
    return t["q"], t["k"], t["v"], t["bias"], torch.rand(2, 1, 5, 7, generator=g) > 0.3


# -- pointwise weights ----------------------------------------------------------------------
def test_pointwise_weights_is_the_reference_formula():
    q, k, v, bias, mask = attention_inputs()
    w = pointwise_weights(torch.matmul(q, k.transpose(-1, -2)) + bias, mask, 3.0)
    # bit for bit: the same ops in the same order as the reference
    assert torch.equal(torch.matmul(w, v), pointwise_attention_reference(q, k, v, bias, mask, 3.0))
    assert torch.equal(w == 0, ~mask.expand_as(w) | (w == 0))  # masked weights are exactly 0


def test_pointwise_weights_unmasked():
    s = torch.randn(3, 4, 6)
    torch.testing.assert_close(pointwise_weights(s, None, 5.0), s * torch.sigmoid(s) / 5.0)
    torch.testing.assert_close(pointwise_weights(s, None, 5.0),
                               pointwise_weights(s, torch.ones_like(s, dtype=torch.bool), 5.0),
                               rtol=0, atol=0)


# -- [kept; own] keys and the self mask -----------------------------------------------------
@pytest.mark.parametrize("n_new,n_old", [(1, 0), (3, 0), (1, 5), (3, 4)])
def test_self_mask(n_new, n_old):
    same = self_mask(n_new, n_old, "cpu")
    i, j = torch.arange(n_new)[:, None], torch.arange(n_old + n_new)[None, :]
    assert same.dtype == torch.bool and torch.equal(same, j == n_old + i)


def test_join_cached_shared_and_per_head():
    mem_pos = torch.tensor([[0, 1, 2], [0, 0, 4]], dtype=torch.int32)
    mem_valid = torch.tensor([[True, True, True], [False, False, True]])
    pos = torch.tensor([[6, 6], [8, 8]])
    k_pos, k_valid, same = join_cached(mem_pos, mem_valid, pos)
    assert k_pos.dtype == pos.dtype
    assert k_pos.tolist() == [[0, 1, 2, 6, 6], [0, 0, 4, 8, 8]]
    assert k_valid.tolist() == [[True] * 5, [False, False, True, True, True]]
    assert torch.equal(same, self_mask(2, 3, "cpu"))
    # per head (B, H, M): the own tokens are every head's
    hp, hv, hs = join_cached(mem_pos[:, None].expand(2, 4, 3), mem_valid[:, None].expand(2, 4, 3),
                             pos)
    assert torch.equal(hp, k_pos[:, None].expand(2, 4, 5))
    assert torch.equal(hv, k_valid[:, None].expand(2, 4, 5)) and torch.equal(hs, same)


def test_cached_rows_equal_the_full_reference():
    """Attention of the last tokens over [kept; own] equals those rows of the full reference."""
    b, h, n, n_new, dh = 2, 4, 9, 3, 8
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, h, n, dh, generator=g) for _ in range(3))
    pos = torch.arange(n).expand(b, n).clone()
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, :2] = False                                      # a left-padded user
    rab = RelativeBias(h, 8, 16)
    full_mask = visibility(pos, pos, valid, torch.eye(n, dtype=torch.bool))
    full = pointwise_attention_reference(q, k, v, rab(pos, pos), full_mask, 4.0)

    n_old = n - n_new
    k_pos, k_valid, same = join_cached(pos[:, :n_old].to(torch.int32), valid[:, :n_old],
                                       pos[:, n_old:])
    mask = visibility(pos[:, n_old:], k_pos, k_valid, same)
    assert torch.equal(mask, full_mask[:, :, n_old:])
    rows = pointwise_attention_reference(q[:, :, n_old:], k, v, rab(pos[:, n_old:], k_pos), mask,
                                         4.0)
    torch.testing.assert_close(rows, full[:, :, n_old:], rtol=1e-5, atol=1e-6)  # matmul order


def test_token_memory():
    k = torch.randn(2, 4, 3, 8)
    pos, valid = torch.tensor([[0, 1, 2], [1, 2, 3]]), torch.ones(2, 3, dtype=torch.bool)
    memory = token_memory({"k": k}, pos, valid)
    assert memory.payload["k"] is k and memory.metadata["valid"] is valid
    assert memory.metadata["pos"].dtype == torch.int32 and memory.metadata["pos"].tolist() == \
        pos.tolist()
    assert memory.nbytes(metadata=True) == k.numel() * 4 + 6 * 4 + 6


def test_hstu_layers_draw_in_natives_order():
    torch.manual_seed(3)
    f1, rab, norm = hstu_layers(CFG, 4 * CFG.d_model)
    torch.manual_seed(3)
    ref = (nn.Linear(32, 128, bias=False), RelativeBias(4, CFG.num_buckets, CFG.max_distance),
           nn.LayerNorm(32))
    for got, want in zip((f1, rab, norm), ref):
        assert type(got) is type(want)
        for a, b in zip(got.state_dict().values(), want.state_dict().values()):
            assert torch.equal(a, b)


# -- hyperparameter checks ------------------------------------------------------------------
def test_check_int():
    check_int("n", 3, 1)
    check_int("n", 0, 0, 4)
    check_int("n", 4, 0, 4)
    for bad in (True, 2.0, "3", None):
        with pytest.raises(ValueError, match="n must be an integer"):
            check_int("n", bad, 1)
    with pytest.raises(ValueError, match=r"n must be >= 1, got 0"):
        check_int("n", 0, 1)
    with pytest.raises(ValueError, match=r"n must be in \[0, 4\], got 5"):
        check_int("n", 5, 0, 4)


def test_check_bool():
    check_bool("flag", True)
    check_bool("flag", False)
    for bad in (1, 0, "yes", None):
        with pytest.raises(ValueError, match="flag must be true or false"):
            check_bool("flag", bad)


@pytest.mark.parametrize("method,raw", [("kivi", {"group_size": True}),
                                        ("beacon", {"raw_beacons": 1}),
                                        ("gqa", {"kv_heads": 0}),
                                        ("ssm", {"expand": True}),
                                        ("reformer", {"n_buckets": 3})])
def test_methods_use_the_checks(method, raw):
    with pytest.raises(ValueError, match=next(iter(raw))):
        get_method(method).parse_hparams(raw)


# -- costs ----------------------------------------------------------------------------------
def test_native_cost_model():
    d = D = CFG.d_model
    assert token_macs(CFG) == (5 * d * D + 4 * D + 2 * d + 2 * D + d, 5 * d * D)
    assert pair_macs(CFG) == (2 * D + CFG.num_heads, 2 * D)


def test_layer_macs_and_dict():
    assert layer_macs((10, 7), (3, 2), 4, 20) == (4 * 10 + 20 * 3, 4 * 7 + 20 * 2)
    assert layer_macs((10, 7), (3, 2), 4, 20, (5, 1)) == (105, 69)
    assert macs_dict((1, 2), (3, 4)) == {"request": 1, "request_matmul": 2, "prefill": 3}
    assert macs_dict((1, 2), (3, 4), prefill_matmul=True) == {
        "request": 1, "request_matmul": 2, "prefill": 3, "prefill_matmul": 4}


@pytest.mark.parametrize("n,q", [(0, 1), (7, 1), (40, 5)])
def test_dense_methods_macs_written_out(n, q):
    (tok, tok_mm), (pair, pair_mm) = token_macs(CFG), pair_macs(CFG)
    assert get_method("native").macs(CFG, None, n, q) == {
        "request": q * tok + q * (n + q) * pair,
        "request_matmul": q * tok_mm + q * (n + q) * pair_mm,
        "prefill": n * tok + n * n * pair}
    m = n + q
    assert get_method("wo_mem").macs(CFG, None, n, q) == {
        "request": m * tok + m * m * pair, "request_matmul": m * tok_mm + m * m * pair_mm,
        "prefill": 0}


# -- chunks of the recompute sequence methods ----------------------------------------------
def test_target_rows():
    pos = torch.tensor([[0, 0, 1, 2, 2], [0, 1, 2, 3, 4]])
    valid = torch.tensor([[False, True, True, True, True], [True] * 5])
    assert target_rows(pos, valid).tolist() == [[False, False, False, True, True],
                                                [False, False, False, False, True]]


@pytest.mark.parametrize("m", [0, 1, 2])
def test_previous_chunks(m):
    x = torch.arange(2 * 4 * 3).view(2, 4, 3).float()          # (B, chunks, c)
    out = previous_chunks(x, m, 1, -1.0)
    for g in range(4):
        want = torch.cat([x[:, j] if j >= 0 else torch.full_like(x[:, 0], -1.0)
                          for j in range(g - m, g + 1)], -1)
        assert torch.equal(out[:, g], want)
