"""Head-level methods: GQA / MQA and MLA (docs/methods/). fp32, dropout 0."""

import pytest
import torch
import torch.nn.functional as F

import malloc_ray.methods.heads  # noqa: F401  (registers gqa, mqa until methods/__init__ does)
import malloc_ray.methods.mla  # noqa: F401  (registers mla)
from malloc_ray.errors import InputError
from malloc_ray.methods import get_method
from malloc_ray.methods.mla import MLA
from malloc_ray.metrics.cost import measure_user_bytes
from malloc_ray.model.hstu import (merge_heads, pointwise_attention, split_heads, visibility)
from model_fixtures import (assert_appends_match_forward, history, random_batch, tiny_config,
                            tiny_model)

LENGTHS = [19, 7, 12, 19, 4]
H, DH = 4, 8  # tiny_config: d = 32, 4 heads of 8


def serve(model, batch):
    return model.score(model.prefill(*history(batch)), batch["items"][:, -1:])[:, 0]


def native_with_tied_kv(group: int):
    """A Native model whose K,V heads are equal within groups of `group` consecutive heads
    (head h copies head (h // group)·group), and the state of a GQA(H / group) model holding
    one copy per group, so that query head h reads KV head h // group in both."""
    native = tiny_model("native", seed=3)
    state, gqa_state = native.state_dict(), {}
    for key, value in state.items():
        if not key.endswith("mixer.f1.weight"):
            gqa_state[key] = value
            continue
        u, q, k, v = value.split(H * DH)
        first = [t.view(H // group, group, DH, -1)[:, 0] for t in (k, v)]  # (H/group, DH, d)
        state[key] = torch.cat([u, q] + [f[:, None].expand(-1, group, -1, -1).reshape(H * DH, -1)
                                         for f in first])
        gqa_state[key] = torch.cat([u, q] + [f.reshape(H // group * DH, -1) for f in first])
    native.load_state_dict(state)
    return native, gqa_state


def test_gqa_with_all_heads_loads_native_weights_and_matches_native():
    native = tiny_model("native", seed=1)
    gqa = tiny_model("gqa", hparams={"kv_heads": H})
    gqa.load_state_dict(native.state_dict(), strict=True)  # same module names and shapes
    batch = random_batch(LENGTHS, seed=1)
    torch.testing.assert_close(gqa.logits(batch), native.logits(batch), rtol=0, atol=1e-6)
    torch.testing.assert_close(serve(gqa, batch), serve(native, batch), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gqa_equals_native_whose_kv_heads_are_tied_in_groups(kv_heads):
    """Checks the grouping convention (query head h reads KV head h // G) for every kv_heads."""
    group = H // kv_heads
    native, gqa_state = native_with_tied_kv(group)
    gqa = tiny_model("gqa", hparams={"kv_heads": kv_heads})
    gqa.load_state_dict(gqa_state, strict=True)
    batch = random_batch(LENGTHS, seed=2)
    # 1e-6 where the matmuls have Native's shapes (kv_heads = H); stacking G query heads into
    # one matmul changes fp32 summation order, so the general 1e-5 applies otherwise.
    atol = 1e-6 if kv_heads == H else 1e-5
    torch.testing.assert_close(gqa.logits(batch), native.logits(batch), rtol=0, atol=atol)
    torch.testing.assert_close(serve(gqa, batch), serve(native, batch), rtol=0, atol=atol)
    if kv_heads < H:  # can fail: untied Native weights (same u, q) give other scores
        untied = tiny_model("native", seed=3)
        assert (untied.logits(batch) - gqa.logits(batch)).abs().max() > 1e-4


def test_mqa_equals_gqa_with_one_kv_head():
    gqa = tiny_model("gqa", hparams={"kv_heads": 1}, seed=4)
    mqa = tiny_model("mqa")
    mqa.load_state_dict(gqa.state_dict(), strict=True)
    batch = random_batch(LENGTHS, seed=4)
    torch.testing.assert_close(mqa.logits(batch), gqa.logits(batch), rtol=0, atol=1e-6)
    torch.testing.assert_close(serve(mqa, batch), serve(gqa, batch), rtol=0, atol=1e-6)
    # MQA really keeps one KV head: 1/H of Native's K,V bytes
    assert measure_user_bytes(mqa, 10)["payload"] * H == measure_user_bytes(tiny_model("native"), 10)["payload"]
    # and its scores use the history (guards the equalities above against a constant model)
    items, labels, lengths = history(batch)
    flipped = mqa.score(mqa.prefill(items, 1 - labels, lengths), batch["items"][:, -1:])[:, 0]
    assert (flipped - serve(mqa, batch)).abs().max() > 1e-4


def test_kv_heads_must_be_positive_and_divide_num_heads():
    with pytest.raises(InputError, match="kv_heads"):
        tiny_model("gqa", hparams={"kv_heads": 3})
    with pytest.raises(InputError, match="kv_heads"):
        tiny_model("gqa", hparams={"kv_heads": 0})
    with pytest.raises(InputError, match="kv_heads"):
        tiny_model("mqa", hparams={"kv_heads": 2})  # MQA has no hyperparameters


@pytest.mark.parametrize("method,hparams", [("gqa", {"kv_heads": 1}), ("gqa", {"kv_heads": 2}),
                                            ("mqa", None), ("mla", {"kv_rank": 8}), ("mla", None)])
def test_cached_equals_recompute_with_appends(method, hparams):
    """Prefill T - 1 - delta interactions, append delta, score the target == full forward."""
    model = tiny_model(method, hparams=hparams, seed=5)
    batch = random_batch(LENGTHS, seed=5)
    full = model.logits(batch).detach()
    torch.testing.assert_close(serve(model, batch), full[:, -1], rtol=0, atol=1e-5)
    assert_appends_match_forward(model, batch, (1, 3))


@pytest.mark.parametrize("method,setting", [
    pytest.param(m, s, id=f"{m}-{s.id}") for m in ("gqa", "mqa", "mla")
    for s in get_method(m).test_settings])
def test_declared_settings_cache_fewer_kv_heads_or_a_narrower_latent(method, setting):
    """The contract tests run at these settings, so each must share: fewer cached K,V heads
    than query heads, or a latent narrower than d_model."""
    model = tiny_model(method, layers=1, hparams=setting.hparams)
    layer = model.prefill(*history(random_batch(setting.lengths, seed=8))).layers[0]
    if method == "mla":
        assert layer.payload["latent"].shape[-1] < model.cfg.d_model
    else:
        assert layer.payload["k"].shape[1] == layer.payload["v"].shape[1] < H


def set_absorb(model, absorb):
    for block in model.blocks:
        block.mixer.absorb = absorb


@pytest.mark.parametrize("kv_rank", [8, 64])
def test_mla_absorbed_equals_non_absorbed(kv_rank):
    model = tiny_model("mla", hparams={"kv_rank": kv_rank}, seed=6)
    batch = random_batch(LENGTHS, seed=6)
    memory = model.prefill(*history(batch))
    candidates = torch.randint(1, 60, (len(LENGTHS), 5), generator=torch.Generator().manual_seed(6))
    set_absorb(model, True)
    absorbed = model.score(memory, candidates)
    set_absorb(model, False)
    reference = model.score(memory, candidates)
    torch.testing.assert_close(absorbed, reference, rtol=0, atol=1e-5)
    # the cache really is the latent, and the score depends on it (else equality is vacuous)
    r = min(kv_rank, 32)
    assert memory.layers[0].payload["latent"].shape[-1] == r
    items, labels, lengths = history(batch)
    other = model.score(model.prefill(items, 1 - labels, lengths), candidates)
    assert (other - reference).abs().max() > 1e-4


def test_mla_with_identity_down_projection_equals_mha_without_kv_silu():
    """d_c = D, W_DKV = I, W_UK = W_K, W_UV = W_V: MLA is HSTU attention with SiLU dropped on
    K and V only (docs/methods/); with the SiLU kept it differs."""
    cfg = tiny_config()
    torch.manual_seed(7)
    layer = MLA(cfg, MLA.Hparams(kv_rank=cfg.d_model)).eval()
    w_k, w_v = torch.randn(2, 32, 32) / 32**0.5
    with torch.no_grad():
        layer.w_dkv.weight.copy_(torch.eye(32))
        layer.w_uk.weight.copy_(w_k)
        layer.w_uv.weight.copy_(w_v)
    batch = random_batch(LENGTHS, seed=7)
    n = batch["items"].shape[1] * 2 - 1
    x = torch.randn(len(LENGTHS), n, 32)
    pos = torch.arange(n)[None] - (n - (2 * batch["lengths"] - 1))[:, None]
    valid = pos >= 0

    def mha(silu_kv):
        u, q = F.silu(layer.f1(x)).chunk(2, -1)
        k, v = F.linear(x, w_k), F.linear(x, w_v)
        if silu_kv:
            k, v = F.silu(k), F.silu(v)
        mask = visibility(pos, pos, valid, torch.eye(n, dtype=torch.bool))
        av = pointwise_attention(split_heads(q, H), split_heads(k, H), split_heads(v, H),
                                 layer.rab(pos, pos), mask, cfg.divisor)
        return u * layer.out_norm(merge_heads(av))

    with torch.no_grad():
        out = layer(x, pos, valid)
        torch.testing.assert_close(out, mha(silu_kv=False), rtol=0, atol=1e-6)
        assert (out - mha(silu_kv=True)).abs().max() > 1e-4


def test_mla_rank_rule_and_bytes():
    """r = min(kv_rank, d_model); the cache is r fp32 floats per token per layer."""
    cfg = tiny_config()
    assert MLA.latent_dim(cfg, MLA.Hparams()) == 32           # default 64 clipped to d = 32
    assert MLA.latent_dim(cfg, MLA.Hparams(kv_rank=8)) == 8
    model = tiny_model("mla", hparams={"kv_rank": 8}, layers=2)
    assert measure_user_bytes(model, 10)["payload"] == 2 * 20 * 8 * 4
    with pytest.raises(InputError, match="kv_rank"):
        tiny_model("mla", hparams={"kv_rank": 0})
