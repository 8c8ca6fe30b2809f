"""H2O and SnapKV (docs/methods/): fp32, dropout off.

Post-hoc methods: every model here loads a Native model's weights (strict), so a difference
from Native is the pruning alone. Leakage, serving = forward, bytes and MACs at each declared
test setting are the registry-driven contract tests (tests/test_method_contract.py).
"""

import pytest
import torch

import malloc_ray.methods.h2o  # noqa: F401  (registers h2o until methods/__init__ imports it)
import malloc_ray.methods.snapkv  # noqa: F401
from malloc_ray.errors import InputError
from malloc_ray.methods.h2o import H2O
from malloc_ray.methods.common.prune import keep_indices
from malloc_ray.methods.snapkv import SnapKV, pool_scores, window_scores
from malloc_ray.model.hstu import pointwise_attention
from model_fixtures import history, random_batch, tiny_model

LENGTHS = [21, 8, 14, 21]  # 20 history interactions = 40 cached tokens for the longest users
METHODS = ["h2o", "snapkv"]


def posthoc(method, hparams=None, layers=3):
    """A pruning model carrying a Native model's weights, and that Native model."""
    native = tiny_model("native", layers=layers)
    model = tiny_model(method, layers=layers, seed=1, hparams=hparams)
    model.load_state_dict(native.state_dict(), strict=True)
    return model, native


def target_score(model, batch, drop=1):
    return model.score(model.prefill(*history(batch, drop)), batch["items"][:, -1:])[:, 0]


def kept_positions(layer_memory, b, h):
    meta = layer_memory.metadata
    return meta["pos"][b, h][meta["valid"][b, h]].tolist()


def layer0_attention(native, items, labels, lengths):
    """Native's first-layer weights A (B, H, N, N) over a history, written out by hand."""
    x, pos, valid = native.interleave(items, labels, lengths)
    block = native.blocks[0]
    _, q, k, _ = block.mixer.project(block.norm(x))
    a = torch.nn.functional.silu(q @ k.transpose(-1, -2) + block.mixer.rab(pos, pos))
    return a / native.cfg.divisor * (pos[:, None, :, None] >= pos[:, None, None, :])


def test_posthoc_has_exactly_natives_parameters():
    native = tiny_model("native")
    for method in METHODS:
        model = tiny_model(method, seed=1)
        assert model.method.workflow == "post-hoc" and model.method.category == "token-prune"
        assert list(model.state_dict()) == list(native.state_dict())
        model.load_state_dict(native.state_dict(), strict=True)
        for name, tensor in native.state_dict().items():
            assert torch.equal(model.state_dict()[name], tensor), name


@pytest.mark.parametrize("method", METHODS)
def test_budget_covering_the_history_equals_native(method):
    model, native = posthoc(method, {"budget": 64})
    batch = random_batch(LENGTHS, seed=1)
    # serving: the same keys in the same order. Native sums the cache's and the own token's
    # parts of the attention (it never concatenates its cache), the pruned memory attends
    # over the concatenation: the same sums, grouped differently, so equal up to rounding
    torch.testing.assert_close(target_score(model, batch), target_score(native, batch),
                               rtol=0, atol=1e-6)
    # the training forward: rows before the target are Native's ops exactly; the target row
    # runs the same sums through the memory path (a 1-row matmul), so only float noise
    pruned, full = model.logits(batch).detach(), native.logits(batch).detach()
    torch.testing.assert_close(pruned[:, :-1], full[:, :-1], rtol=0, atol=0)
    torch.testing.assert_close(pruned[:, -1], full[:, -1], rtol=0, atol=1e-5)
    # appended interactions, then a request
    memory, nat_memory = model.prefill(*history(batch, 3)), native.prefill(*history(batch, 3))
    new = slice(-3, -1)
    memory, appended = model.append(memory, batch["items"][:, new], batch["labels"][:, new])
    nat_memory, nat_appended = native.append(nat_memory, batch["items"][:, new],
                                             batch["labels"][:, new])
    torch.testing.assert_close(appended, nat_appended, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.score(memory, batch["items"][:, -1:]),
                               native.score(nat_memory, batch["items"][:, -1:]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_small_budget_changes_the_score(method):
    """The pruning is real: with fewer kept tokens than cached ones the target score moves,
    and the rows before the target (exact attention in forward) do not."""
    model, native = posthoc(method, {"budget": 8})
    batch = random_batch(LENGTHS, seed=2)
    pruned, full = model.logits(batch).detach(), native.logits(batch).detach()
    assert (pruned[:, -1] - full[:, -1]).abs().max() > 1e-3
    torch.testing.assert_close(pruned[:, :-1], full[:, :-1], rtol=0, atol=0)
    assert all(m.payload["k"].shape[2] == 8 for m in model.prefill(*history(batch)).layers)


@pytest.mark.parametrize("cls,setting", [
    pytest.param(c, s, id=f"{c.name}-{s.id}") for c in (H2O, SnapKV) for s in c.test_settings])
def test_declared_settings_keep_fewer_tokens_than_the_history(cls, setting):
    """The contract tests run at these settings, so they must prune: every head of every layer
    keeps fewer tokens than the longest user's history."""
    model, _ = posthoc(cls.name, setting.hparams)
    batch = random_batch(setting.lengths, seed=3)
    n_cached = 2 * (max(setting.lengths) - 1)
    for layer in model.prefill(*history(batch)).layers:
        assert layer.metadata["valid"].sum(-1).max() < n_cached


@pytest.mark.parametrize("method", METHODS)
def test_selection_is_deterministic_and_batch_independent(method):
    model, _ = posthoc(method, {"budget": 10})
    batch = random_batch(LENGTHS, seed=4)
    first, again = model.prefill(*history(batch)), model.prefill(*history(batch))
    for a, b in zip(first.layers, again.layers):
        assert torch.equal(a.metadata["pos"], b.metadata["pos"])
    # a user's memory does not depend on who else is in the batch (padding is never kept)
    items, labels, lengths = history(batch)
    alone = model.prefill(items[1:2, -int(lengths[1]):], labels[1:2, -int(lengths[1]):],
                          lengths[1:2])
    for in_batch, single in zip(first.layers, alone.layers):
        for h in range(model.cfg.num_heads):
            assert kept_positions(in_batch, 1, h) == kept_positions(single, 0, h)
    # kept positions differ between heads somewhere (selection is per head)
    pos = first.layers[0].metadata["pos"][0]
    assert any(not torch.equal(pos[0], pos[h]) for h in range(1, pos.shape[0]))


def test_ties_keep_the_earlier_position():
    priority = torch.tensor([[[1.0, 3.0, 1.0, 1.0, float("inf"), 1.0]]])
    assert keep_indices(priority, 3).tolist() == [[[0, 1, 4]]]
    assert keep_indices(priority, 10).tolist() == [[[0, 1, 2, 3, 4, 5]]]


@pytest.mark.parametrize("method,key,hparams", [
    ("h2o", "recent", {"budget": 12, "recent": 6}),
    ("snapkv", "window", {"budget": 12, "window": 6})])
def test_recent_tokens_always_kept(method, key, hparams):
    model, _ = posthoc(method, hparams)
    batch = random_batch(LENGTHS, seed=5)
    items, labels, lengths = history(batch, 4)
    memory = model.prefill(items, labels, lengths)
    n = hparams[key]

    def check(memory, n_tokens):
        for layer in memory.layers:
            for b in range(len(LENGTHS)):
                recent = set(range(max(0, int(n_tokens[b]) - n), int(n_tokens[b])))
                for h in range(model.cfg.num_heads):
                    kept = kept_positions(layer, b, h)
                    assert recent <= set(kept), (b, h)
                    assert len(kept) == min(12, int(n_tokens[b]))

    check(memory, 2 * lengths)
    for step in range(3):  # appended interactions: evicted back to the budget, recent kept
        new = slice(-4 + step, -3 + step)
        memory, _ = model.append(memory, batch["items"][:, new], batch["labels"][:, new])
        check(memory, memory.next_pos)
    # the check can fail: by score alone some of the most recent tokens would be dropped
    if method == "h2o":
        bare, _ = posthoc("h2o", {"budget": 12, "recent": 0})
        memory = bare.prefill(items, labels, lengths)
        last = set(range(2 * int(lengths[0]) - n, 2 * int(lengths[0])))
        assert any(not last <= set(kept_positions(layer, 0, h))
                   for layer in memory.layers for h in range(model.cfg.num_heads))


def test_kernel_one_pooling_equals_raw_scores():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, 9, 12, generator=g)
    raw = w[..., -4:, :].abs().mean(-2)
    assert torch.equal(window_scores(w, 4, 1)[..., :8], raw[..., :8])
    assert torch.isinf(window_scores(w, 4, 1)[..., 8:]).all()
    assert torch.equal(pool_scores(raw, 1), raw)
    # kernel 3: the mean of each token and its neighbours, zero beyond the ends (as SnapKV)
    prefix = raw[..., :8]
    padded = torch.nn.functional.pad(prefix, (1, 1))
    manual = (padded[..., :-2] + padded[..., 1:-1] + padded[..., 2:]) / 3
    torch.testing.assert_close(window_scores(w, 4, 3)[..., :8], manual, rtol=0, atol=1e-7)
    assert (manual - prefix).abs().max() > 1e-3


def test_snapkv_kernel_one_keeps_top_raw_scores():
    """Model level: with kernel 1 the kept prefix tokens are the top raw mean |A| of the
    window queries, recomputed here from Native's layer-0 attention."""
    model, native = posthoc("snapkv", {"budget": 10, "window": 4, "kernel": 1}, layers=1)
    batch = random_batch([21], seed=6)
    items, labels, lengths = history(batch)
    n = 2 * int(lengths[0])
    a = layer0_attention(native, items, labels, lengths)[:, :, -4:]  # window rows
    raw = a.abs().mean(-2)[0, :, : n - 4]
    memory = model.prefill(items, labels, lengths).layers[0]
    for h in range(model.cfg.num_heads):
        top = sorted(torch.sort(raw[h], descending=True, stable=True).indices[:6].tolist())
        assert kept_positions(memory, 0, h) == top + list(range(n - 4, n))


def test_h2o_scores_are_normalised_column_sums_and_appends_accumulate():
    model, _ = posthoc("h2o", {"budget": 64}, layers=1)
    batch = random_batch([15], seed=7)
    one_shot = model.prefill(*history(batch)).layers[0].metadata
    n = 28
    assert one_shot["seen"][0, 0].tolist() == list(range(n, 0, -1))  # n - j queries see key j
    # accumulated over appends == one-shot over the whole history (all tokens kept)
    memory = model.prefill(*history(batch, 4))
    for step in range(3):
        new = slice(-4 + step, -3 + step)
        memory, _ = model.append(memory, batch["items"][:, new], batch["labels"][:, new])
    appended = memory.layers[0].metadata
    assert torch.equal(appended["seen"], one_shot["seen"])
    torch.testing.assert_close(appended["score"], one_shot["score"], rtol=0, atol=1e-6)
    # and the scores are sums of |A| (not A): recompute column sums from the model's layer
    a = layer0_attention(tiny_model("native", layers=1), *history(batch))
    torch.testing.assert_close(one_shot["score"], a.abs().sum(-2), rtol=0, atol=1e-6)
    assert (a.sum(-2) - a.abs().sum(-2)).abs().max() > 1e-4  # signed sums would differ


def test_h2o_keeps_recent_plus_top_normalised_scores():
    """Model level: the kept tokens are the 4 most recent plus the top-4 of |A| column sums
    divided by the n - j queries that saw key j, recomputed from Native's layer 0."""
    model, native = posthoc("h2o", {"budget": 8, "recent": 4}, layers=1)
    batch = random_batch([21], seed=6)
    items, labels, lengths = history(batch)
    n = 2 * int(lengths[0])
    total = layer0_attention(native, items, labels, lengths).abs().sum(-2)[0]
    normalised = total / torch.arange(n, 0, -1)
    memory = model.prefill(items, labels, lengths).layers[0]
    differs = False
    for h in range(model.cfg.num_heads):
        top = torch.sort(normalised[h, : n - 4], descending=True, stable=True).indices[:4]
        raw = torch.sort(total[h, : n - 4], descending=True, stable=True).indices[:4]
        assert kept_positions(memory, 0, h) == sorted(top.tolist()) + list(range(n - 4, n))
        differs |= set(top.tolist()) != set(raw.tolist())
    assert differs  # unnormalised sums (favouring early tokens) would keep other tokens


@pytest.mark.parametrize("method", METHODS)
def test_kept_tokens_keep_their_original_positions(method):
    model, native = posthoc(method, {"budget": 9}, layers=1)
    batch = random_batch(LENGTHS, seed=8)
    items, labels, lengths = history(batch)
    memory = model.prefill(items, labels, lengths).layers[0]
    full = native.prefill(items, labels, lengths).layers[0]
    first = (full.metadata["pos"] == 0).int().argmax(1)  # column of position 0 per user
    for b in range(len(LENGTHS)):
        for h in range(model.cfg.num_heads):
            kept = kept_positions(memory, b, h)
            assert kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < 2 * int(lengths[b])
            cols = torch.tensor(kept) + first[b]
            assert torch.equal(memory.payload["k"][b, h][memory.metadata["valid"][b, h]],
                               full.payload["k"][b, h, cols])
    # the request equals full attention restricted to the kept positions, with the bias at
    # the original distances (an independent reference built from Native's layer)
    mixer, block = native.blocks[0].mixer, native.blocks[0]
    target = native.item_emb(batch["items"][:, -1:])
    t_pos = 2 * lengths[:, None]
    u, q, k_t, v_t = mixer.project(block.norm(target))
    k_all = torch.cat([full.payload["k"], k_t], 2)
    v_all = torch.cat([full.payload["v"], v_t], 2)
    k_pos = torch.cat([full.metadata["pos"].long(), t_pos], 1)
    keep = torch.zeros(len(LENGTHS), model.cfg.num_heads, 1, k_all.shape[2], dtype=torch.bool)
    for b in range(len(LENGTHS)):
        for h in range(model.cfg.num_heads):
            keep[b, h, 0, torch.tensor(kept_positions(memory, b, h)) + first[b]] = True
    keep[..., -1] = True
    av = pointwise_attention(q, k_all, v_all, mixer.rab(t_pos, k_pos), keep, native.cfg.divisor)
    reference = u * mixer.out_norm(av.transpose(1, 2).reshape(len(LENGTHS), 1, -1))
    served, _ = model.blocks[0].mixer.step(model.blocks[0].norm(target), t_pos, memory, False)
    torch.testing.assert_close(served, reference, rtol=0, atol=1e-6)


def test_hparams_defaults_and_validation():
    assert (H2O.Hparams().budget, H2O.Hparams().recent) == (32, 16)
    assert H2O.parse_hparams({"budget": 64}).recent == 32
    snap = SnapKV.Hparams()
    assert (snap.budget, snap.window, snap.kernel) == (32, 8, 5)
    for cls, raw in ((H2O, {"budget": 0}), (H2O, {"recent": 40}), (H2O, {"budget": 2.5}),
                     (SnapKV, {"window": 0}), (SnapKV, {"window": 33}), (SnapKV, {"kernel": 4}),
                     (SnapKV, {"kernel": True}), (SnapKV, {"pool": 3})):
        with pytest.raises(InputError):
            cls.parse_hparams(raw)


def test_forward_rejects_right_padded_windows():
    model, _ = posthoc("h2o")
    x = torch.randn(1, 5, 32)
    pos = torch.tensor([[0, 1, 2, -1, -2]])  # right padding: the last column is not real
    valid = pos >= 0
    with pytest.raises(ValueError, match="left-padded"):
        model.blocks[0].mixer(x, pos, valid)


@pytest.mark.parametrize("method", METHODS)
def test_bytes_and_macs_follow_the_kept_count(method):
    """Explicit counts (the contract tests compare measurement with the closed form; this
    pins the closed form itself to the kept tokens)."""
    from malloc_ray.metrics.cost import measure_user_bytes

    model, _ = posthoc(method, {"budget": 8}, layers=2)
    extra = 8 if method == "h2o" else 0  # H2O's running |A| sum (fp32) and count (int32)
    for n_history, kept in ((3, 6), (20, 8)):
        measured = measure_user_bytes(model, n_history)
        assert measured["payload"] == 2 * (2 * kept * 32 * 4)  # 2 layers, K and V, d = 32
        assert measured["with_metadata"] == measured["payload"] + 2 * 4 * kept * (5 + extra)
    cfg, hp = model.cfg, model.hp
    assert model.method.macs(cfg, hp, 40)["request"] == model.method.macs(cfg, hp, 8)["request"]
    assert model.method.macs(cfg, hp, 40)["prefill"] > model.method.macs(cfg, hp, 8)["prefill"]
