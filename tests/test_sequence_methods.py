"""Linformer, Reformer, Longformer: the equivalences, against plain dense references, and
what the declared test settings must do (fp32, dropout off). Leakage, serving = forward, bytes
and MACs at those settings are the registry-driven contract tests
(tests/test_method_contract.py)."""

import pytest
import torch
import torch.nn.functional as F

import malloc_ray.methods.linformer  # noqa: F401  (registers the methods until __init__ does)
import malloc_ray.methods.longformer  # noqa: F401
import malloc_ray.methods.reformer  # noqa: F401
from malloc_ray.errors import InputError
from malloc_ray.methods.base import get_method
from malloc_ray.methods.linformer import slots
from malloc_ray.metrics.cost import closed_form_macs, flop_counter_macs, measure_user_bytes
from malloc_ray.model.hstu import merge_heads, split_heads, visibility
from model_fixtures import history, random_batch, tiny_config, tiny_model

LENGTHS = [21, 8, 14, 21]
N = 2 * tiny_config().max_len  # 80 = 2 max_len: the rows of Linformer's E
# the declared test settings, which exercise each method's approximation on the tiny model
SPARSE = {m: get_method(m).test_settings[0].hparams
          for m in ("linformer", "longformer", "reformer")}
DECLARED = [pytest.param(m, s, id=f"{m}-{s.id}") for m in sorted(SPARSE)
            for s in get_method(m).test_settings]


def mixer_inputs(lengths, n, q=1, seed=0, d=32):
    """Left-padded tokens for one layer: n history slots, then q candidates sharing a position."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    hist = torch.arange(n)[None, :] - (n - lengths)[:, None]
    pos = torch.cat([hist, lengths[:, None].expand(-1, q)], 1)
    valid = torch.cat([hist >= 0, torch.ones(len(lengths), q, dtype=torch.bool)], 1)
    return torch.randn(len(lengths), n + q, d, generator=g), pos, valid


def dense(mixer, u, q, k, v, bias, mask, divisor):
    """Plain HSTU pointwise attention with an explicit mask: u * LN(SiLU(QK^T + b) / n * M . V)."""
    weights = F.silu(torch.matmul(q, k.transpose(-1, -2)) + bias) / divisor * mask
    return u * mixer.out_norm(merge_heads(torch.matmul(weights, v)))


def is_target(pos, valid):
    last = pos.masked_fill(~valid, -10**9).amax(1, keepdim=True)
    return valid & (pos == last)


def mixer_of(method, **hp):
    torch.manual_seed(0)
    cls = get_method(method)
    return cls(tiny_config(), cls.parse_hparams(hp)).eval()


def assert_no_label_leak(model, leaks=False):
    """The contract probe: flipping y_t never changes the logit of i_t or earlier items."""
    batch = random_batch(LENGTHS, seed=11)
    base = model.logits(batch).detach()
    s = batch["items"].shape[1]
    leaked = False
    for t in (s - 2, s - 4, s - 9):
        changed = {**batch, "labels": batch["labels"].clone()}
        changed["labels"][:, t] = 1 - changed["labels"][:, t]
        after = model.logits(changed).detach()
        leaked |= bool((after[:, : t + 1] != base[:, : t + 1]).any())
        assert (after[:, t + 1:] - base[:, t + 1:]).abs().max() > 0  # later items do see y_t
    assert leaked == leaks


# -- Longformer -----------------------------------------------------------------------------

def test_longformer_window_covering_everything_equals_native():
    native = tiny_model("native")
    wide = tiny_model("longformer", hparams={"window": N})
    narrow = tiny_model("longformer", hparams={"window": 4})
    for model in (wide, narrow):
        model.load_state_dict(native.state_dict())  # same parameters and names as Native
    batch = random_batch(LENGTHS, seed=1)
    reference = native.logits(batch).detach()
    torch.testing.assert_close(wide.logits(batch).detach(), reference, rtol=0, atol=1e-5)
    assert (narrow.logits(batch).detach() - reference).abs().max() > 1e-3


@pytest.mark.parametrize("divide_by_window", [False, True])
def test_longformer_band_rows_and_global_target_row(divide_by_window):
    w = 5
    mixer = mixer_of("longformer", window=w, divide_by_window=divide_by_window)
    for q_count in (1, 3):
        x, pos, valid = mixer_inputs([17, 6, 11], 17, q=q_count, seed=q_count)
        u, q, k, v = mixer.project(x)
        bias = mixer.rab(pos, pos)
        same = torch.eye(x.shape[1], dtype=torch.bool)
        causal = visibility(pos, pos, valid, same)
        dist = pos[:, :, None] - pos[:, None, :]
        band = (((dist > 0) & (dist <= w)) | same) & valid[:, None, :]
        target = is_target(pos, valid)
        band_div = float(w) if divide_by_window else mixer.cfg.divisor
        expected = torch.where(target[..., None],
                               dense(mixer, u, q, k, v, bias, causal, mixer.cfg.divisor),
                               dense(mixer, u, q, k, v, bias, band[:, None], band_div))
        out = mixer(x, pos, valid)
        torch.testing.assert_close(out[valid], expected[valid], rtol=0, atol=1e-6)
        # non-degenerate: the band really drops keys the target keeps
        full = dense(mixer, u, q, k, v, bias, causal, band_div)
        assert (out[valid & ~target] - full[valid & ~target]).abs().max() > 1e-3


# -- Reformer -------------------------------------------------------------------------------

def reformer_reference(mixer, x, pos, valid, buckets=None):
    """Dense LSH attention by its definition: per round, a token sees the earlier tokens of its
    bucket whose bucket rank is in its own or the previous chunk (rank // bucket_size), and
    itself (only if nothing else, or it is a target, when mask_self); rounds averaged."""
    hp = mixer.hp
    u, qk, v = F.silu(mixer.f1(x)).chunk(3, dim=-1)
    h = mixer.cfg.num_heads
    q, v = split_heads(qk, h), split_heads(v, h)
    k = F.normalize(q, dim=-1)
    groups = mixer.hash(k) if buckets is None else buckets
    bias = mixer.rab(pos, pos)
    eye = torch.eye(x.shape[1], dtype=torch.bool)
    earlier = (pos[:, None, :] < pos[:, :, None])[:, None]
    outs = []
    for r in range(hp.n_hashes):
        g = groups[:, :, r]
        same = (g[..., :, None] == g[..., None, :]) & valid[:, None, None, :] & earlier
        rank = same.sum(-1)                      # earlier tokens of the same bucket
        chunk = rank // hp.bucket_size
        other = same & (chunk[..., None, :] >= chunk[..., :, None] - 1)
        own = eye & valid[:, None, :, None]
        if hp.mask_self:
            own = own & (is_target(pos, valid)[:, None, :, None] | ~other.any(-1, keepdim=True))
        weights = F.silu(torch.matmul(q, k.transpose(-1, -2)) + bias) / mixer.cfg.divisor
        outs.append(torch.matmul(weights * (other | own), v))
    return u * mixer.out_norm(merge_heads(torch.stack(outs).mean(0)))


@pytest.mark.parametrize("mask_self", [True, False])
def test_reformer_one_bucket_one_round_equals_shared_qk_causal_attention(mask_self):
    mixer = mixer_of("reformer", n_buckets=1, n_hashes=1, bucket_size=N, mask_self=mask_self)
    hashed = mixer_of("reformer", n_buckets=4, n_hashes=1, bucket_size=4, mask_self=mask_self)
    weights = {k: t for k, t in mixer.state_dict().items() if k != "rotations"}
    hashed.load_state_dict(weights, strict=False)  # same weights, real rotations
    for q_count in (1, 3):
        x, pos, valid = mixer_inputs([17, 6, 11], 17, q=q_count, seed=q_count)
        u, qk, v = F.silu(mixer.f1(x)).chunk(3, dim=-1)
        q, v = split_heads(qk, 4), split_heads(v, 4)
        same = torch.eye(x.shape[1], dtype=torch.bool)
        mask = visibility(pos, pos, valid, same)          # plain causal HSTU mask
        if mask_self:  # own score only for targets and tokens that see nothing else
            alone = ~visibility(pos, pos, valid, torch.zeros_like(same)).any(-1, keepdim=True)
            keep = is_target(pos, valid)[:, None, :, None] | alone
            mask = mask & (~same | keep)
        expected = dense(mixer, u, q, F.normalize(q, dim=-1), v, mixer.rab(pos, pos), mask,
                         mixer.cfg.divisor)
        torch.testing.assert_close(mixer(x, pos, valid)[valid], expected[valid], rtol=0,
                                   atol=1e-6)
        assert (hashed(x, pos, valid)[valid] - expected[valid]).abs().max() > 1e-3


@pytest.mark.parametrize("hp", [{"bucket_size": 3, "n_buckets": 4, "n_hashes": 2},
                                {"bucket_size": 2, "n_buckets": 6, "n_hashes": 3,
                                 "mask_self": False},
                                {"bucket_size": 5, "n_buckets": 2, "n_hashes": 1}])
def test_reformer_sorted_chunks_equal_dense_bucket_definition(hp):
    """The sort / chunk / look-back machinery equals the rule written densely, with padding
    and with tied candidates (which widen the look-back)."""
    mixer = mixer_of("reformer", **hp)
    for q_count in (1, 8):
        x, pos, valid = mixer_inputs([29, 7, 18, 29], 29, q=q_count, seed=10 + q_count)
        torch.testing.assert_close(mixer(x, pos, valid)[valid],
                                   reformer_reference(mixer, x, pos, valid)[valid],
                                   rtol=0, atol=1e-6)
    # non-degenerate: the buckets matter (all-in-one-bucket gives another answer)
    one = torch.zeros(x.shape[0], 4, hp["n_hashes"], x.shape[1], dtype=torch.long)
    assert (reformer_reference(mixer, x, pos, valid, buckets=one)[valid]
            - mixer(x, pos, valid)[valid]).abs().max() > 1e-3


def test_reformer_rotations_are_fixed_buffers():
    model = tiny_model("reformer", hparams=SPARSE["reformer"])
    rotations = [b.mixer.rotations for b in model.blocks]
    assert rotations[0].shape == (2, 8, 2)  # (n_hashes, d_h, n_buckets / 2)
    assert "blocks.0.mixer.rotations" in model.state_dict()
    batch = random_batch(LENGTHS, seed=3)
    first = model.logits(batch).detach()
    model.train()
    model.logits(batch)  # a training pass does not redraw them
    model.eval()
    torch.testing.assert_close(model.logits(batch).detach(), first, rtol=0, atol=0)
    other = tiny_model("reformer", seed=1, hparams=SPARSE["reformer"])
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other.logits(batch).detach(), first, rtol=0, atol=0)


# -- Linformer ------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_linformer_identity_projection_equals_plain_attention(causal):
    """k = N, E = I: causal=False is bidirectional attention, causal=True causal attention
    (both without the relative bias, which Linformer drops)."""
    mixer = mixer_of("linformer", k=N, causal=causal)
    with torch.no_grad():
        mixer.proj_k.copy_(torch.eye(N))
    # several candidates share a position, hence an E row: only the causal form separates them
    for q_count in ((1, 3) if causal else (1,)):
        x, pos, valid = mixer_inputs([17, 6, 11], 17, q=q_count, seed=q_count)
        u, q, k, v = F.silu(mixer.f1(x)).chunk(4, dim=-1)
        q, k, v = (split_heads(t, 4) for t in (q, k, v))
        same = torch.eye(x.shape[1], dtype=torch.bool)
        mask = (visibility(pos, pos, valid, same) if causal
                else valid[:, None, None, :].expand(-1, 1, x.shape[1], -1))
        expected = dense(mixer, u, q, k, v, 0.0, mask, mixer.cfg.divisor)
        out = mixer(x, pos, valid)
        torch.testing.assert_close(out[valid], expected[valid], rtol=0, atol=1e-6)
    with torch.no_grad():  # non-degenerate: a random E is another answer
        mixer.proj_k.normal_()
    assert (mixer(x, pos, valid)[valid] - expected[valid]).abs().max() > 1e-3


def test_linformer_k_is_clipped_to_n_and_v_gets_its_own_projection():
    mixer = mixer_of("linformer", k=500, share_kv=False)
    assert mixer.proj_k.shape == mixer.proj_v.shape == (N, N)
    assert mixer_of("linformer").proj_v is None


def test_linformer_paper_projection_leaks_labels_and_the_causal_default_does_not():
    assert_no_label_leak(tiny_model("linformer"), leaks=False)
    assert_no_label_leak(tiny_model("linformer", hparams={"causal": False}), leaks=True)


def test_linformer_rejects_positions_beyond_its_projection():
    mixer = mixer_of("linformer")
    x, pos, valid = mixer_inputs([3], 3)
    with pytest.raises(ValueError, match="positions must be < 2 max_len"):
        mixer(x, pos + N, valid)


# -- all three, at the declared settings ----------------------------------------------------

@pytest.mark.parametrize("method,setting", DECLARED)
def test_declared_settings_are_sparse_at_their_length(method, setting):
    """The contract tests run at these settings, so each must approximate over the setting's
    longest sequence: Linformer projects it to fewer slots, Longformer's band is shorter, and
    Reformer hashes its keys into at least 2 buckets."""
    model = tiny_model(method, hparams=setting.hparams)
    n = 2 * max(setting.lengths) - 1  # tokens of the longest window (target included)
    mixer = model.blocks[0].mixer
    if method == "linformer":
        assert slots(model.cfg, model.hp) < n
    elif method == "longformer":
        assert model.hp.window < n
    else:
        x, pos, valid = mixer_inputs([n], n, q=0)
        qk = F.silu(mixer.f1(x)).chunk(3, dim=-1)[1]
        keys = F.normalize(split_heads(qk, model.cfg.num_heads), dim=-1)
        assert mixer.n_buckets >= 2 and mixer.hash(keys).unique().numel() >= 2


@pytest.mark.parametrize("method", sorted(SPARSE))
def test_slate_order_does_not_change_any_score(method):
    """Candidates share the last position, which each method treats apart (Linformer's ties,
    Reformer's ranks, Longformer's global rows): permuting the slate permutes the scores."""
    model = tiny_model(method, hparams=SPARSE[method])
    memory = model.prefill(*history(random_batch(LENGTHS, seed=12)))
    slate = torch.randint(1, 60, (len(LENGTHS), 5), generator=torch.Generator().manual_seed(4))
    scores = model.score(memory, slate)
    perm = torch.tensor([3, 0, 4, 2, 1])
    torch.testing.assert_close(model.score(memory, slate[:, perm]), scores[:, perm], rtol=0,
                               atol=1e-5)
    assert (scores[:, 0] - scores[:, 1]).abs().max() > 1e-4  # candidates do differ


@pytest.mark.parametrize("method", sorted(SPARSE))
def test_closed_form_macs_and_bytes_at_dense_settings(method):
    """The contract tests' MACs and bytes checks where each method degenerates to dense
    attention (not declared settings: they would not approximate anything)."""
    hp = {"linformer": {"k": 200, "causal": False}, "reformer": {"bucket_size": 64},
          "longformer": {"window": 200}}[method]
    model = tiny_model(method, layers=2, hparams=hp)
    for n_history, q in ((5, 1), (16, 3), (30, 1)):
        assert flop_counter_macs(model, n_history, q) == \
            closed_form_macs(model, n_history, q)["request_matmul"], (n_history, q)
        macs = model.method.macs(model.cfg, model.hp, 2 * n_history, q)
        assert macs["request"] > macs["request_matmul"] and macs["prefill"] == 0
    assert measure_user_bytes(model, 17) == {"payload": 0, "with_metadata": 0}
    assert model.method.memory_bytes(model.cfg, model.hp, 34, True) == 0


@pytest.mark.parametrize("method,raw", [("linformer", {"k": 0}), ("reformer", {"n_buckets": 3}),
                                        ("reformer", {"bucket_size": 0}),
                                        ("reformer", {"n_hashes": 0}),
                                        ("longformer", {"window": 0}),
                                        ("longformer", {"windw": 3}),
                                        ("linformer", {"causal": "no"}),
                                        ("reformer", {"mask_self": 1}),
                                        ("longformer", {"divide_by_window": "yes"})])
def test_bad_hparams_are_input_errors(method, raw):
    with pytest.raises(InputError):
        get_method(method).parse_hparams(raw)
