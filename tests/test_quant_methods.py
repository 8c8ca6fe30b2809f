"""KIVI and IntactKV: the quantizer, and the equivalences of docs/methods/.

fp32, dropout off. The models here use each method's first declared test setting (small
groups, so that the tiny sequences are really quantized); the registry-driven contract tests
(tests/test_method_contract.py) check leakage, serving = forward, bytes and MACs at every
declared setting.
"""

import pytest
import torch

import malloc_ray.methods.intactkv  # noqa: F401  (registers the methods; the lead
import malloc_ray.methods.kivi  # noqa: F401      adds them to methods/__init__.py)
from malloc_ray.errors import InputError
from malloc_ray.methods import get_method
from malloc_ray.methods.common import quant
from malloc_ray.metrics.cost import closed_form_macs, flop_counter_macs, measure_user_bytes
from model_fixtures import history, random_batch, tiny_model

LENGTHS = [21, 8, 14, 1, 21, 3]  # left padding, a user with no history, ragged groups
METHODS = ["intactkv", "kivi"]
QUANTIZED = {m: get_method(m).test_settings[0].hparams for m in METHODS}  # really quantized


def with_native_weights(method, **hparams):
    native = tiny_model("native")
    model = tiny_model(method, hparams={**QUANTIZED[method], **hparams})
    model.load_state_dict(native.state_dict(), strict=True)  # post-hoc: Native's weights as is
    return native, model


def served(model, batch):
    return model.score(model.prefill(*history(batch)), batch["items"][:, -1:])[:, 0]


# -- the quantizer ------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (32, 13, 1):  # 13: a short last byte
        codes = torch.randint(0, 2**bits, (3, 5, n), generator=g).to(torch.uint8)
        packed = quant.pack(codes, bits)
        assert packed.dtype == torch.uint8 and packed.shape[-1] == -(-n * bits // 8)
        assert torch.equal(quant.unpack(packed, bits, n), codes)
    # every code value survives in every slot of a byte
    codes = torch.arange(2**bits, dtype=torch.uint8).repeat(8)
    assert torch.equal(quant.unpack(quant.pack(codes, bits), bits, codes.numel()), codes)


def test_16_bits_stores_fp32_as_is():
    x = torch.randn(2, 7, 12)
    enc = quant.encode(x, 16, 4, 1)
    assert set(enc) == {"codes"} and enc["codes"] is x
    assert quant.decode(enc, 16, 4, 1, 12) is x


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim,group", [(1, 4), (-1, 8), (-1, 5)])  # 5: short last group
def test_quantize_error_at_most_half_scale(bits, dim, group):
    x = torch.randn(2, 16, 20, generator=torch.Generator().manual_seed(1)) * 3
    x[0, :, 3] = 0.7  # a constant group: scale 0, must come back exactly
    codes, scale, zero = quant.quantize(x, bits, group, dim)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    assert scale.shape[dim] == -(-x.shape[dim] // group)
    x_hat = quant.dequantize(codes, scale, zero, group, dim)
    half = 0.5 * quant._per_element(scale.movedim(dim, -1), group, x.shape[dim]).movedim(-1, dim)
    err = (x_hat - x).abs()
    assert (err <= half + 1e-6).all()
    if dim == 1:
        assert torch.equal(x_hat[0, :, 3], x[0, :, 3])
    assert err.max() > 1e-4 * 2 ** (8 - bits)  # it really is lossy (the bound can fail)
    # encode/decode is the same thing through the packed bytes
    enc = quant.encode(x, bits, group, dim)
    torch.testing.assert_close(quant.decode(enc, bits, group, dim, x.shape[-1]), x_hat,
                               rtol=0, atol=0)


def test_hparams_are_validated():
    for method, bad in (("kivi", {"bits": 3}), ("kivi", {"group_size": 0}),
                        ("kivi", {"residual_length": -1}), ("kivi", {"pivots": 1}),
                        ("intactkv", {"pivots": -1}), ("intactkv", {"residual_length": 4})):
        with pytest.raises(InputError):
            get_method(method).parse_hparams(bad)
    assert get_method("kivi").parse_hparams({}) == get_method("kivi").Hparams(2, 32, 32)
    assert get_method("intactkv").parse_hparams({}) == get_method("intactkv").Hparams(2, 32, 1)


# -- the methods --------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_post_hoc_model_loads_native_state_dict_strict(method):
    native = tiny_model("native")
    model = tiny_model(method)
    assert model.method.workflow == "post-hoc" and model.method.category == "precision"
    assert list(model.state_dict()) == list(native.state_dict())
    model.load_state_dict(native.state_dict(), strict=True)


@pytest.mark.parametrize("method,setting", [
    pytest.param(m, s, id=f"{m}-{s.id}") for m in METHODS for s in get_method(m).test_settings])
def test_declared_settings_quantize_most_history_tokens(method, setting):
    """The contract tests run at these settings, so they must quantize: the packed part holds
    more than half of the longest user's cached tokens."""
    model = tiny_model(method, layers=1, hparams=setting.hparams)
    n_history = max(setting.lengths) - 1
    memory = model.prefill(*history(random_batch([n_history + 1], seed=2))).layers[0]
    assert memory.payload["k_codes"].shape[1] > n_history  # of 2 n_history cached tokens


@pytest.mark.parametrize("method", METHODS)
def test_16_bits_equals_native(method):
    native, model = with_native_weights(method, bits=16)
    _, lossy = with_native_weights(method, bits=2)
    batch = random_batch(LENGTHS, seed=3)
    reference = native.logits(batch).detach()
    torch.testing.assert_close(model.logits(batch).detach(), reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(served(model, batch), reference[:, -1], rtol=0, atol=1e-5)
    assert (lossy.logits(batch)[:, -1] - reference[:, -1]).abs().max() > 1e-3  # can fail


def test_kivi_residual_at_least_history_equals_native():
    """R >= N_c: nothing is quantized, even at 2 bits (and R = N_c - 1 already differs)."""
    batch = random_batch(LENGTHS, seed=4)
    n_c = 2 * (max(LENGTHS) - 1)
    native, exact = with_native_weights("kivi", residual_length=n_c)
    reference = native.logits(batch)[:, -1].detach()
    torch.testing.assert_close(exact.logits(batch)[:, -1].detach(), reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(served(exact, batch), reference, rtol=0, atol=1e-5)
    assert exact.prefill(*history(batch)).nbytes() == 0  # all fp32: no packed payload
    _, short = with_native_weights("kivi", residual_length=n_c - 1, group_size=1)
    assert (served(short, batch) - reference).abs().max() > 0


@pytest.mark.parametrize("method", METHODS)
def test_8_bits_close_to_native_2_bits_measurably_not(method):
    batch = random_batch(LENGTHS, seed=5)
    native = tiny_model("native")
    reference = served(native, batch)
    gap = {}
    for bits in (8, 4, 2):
        _, model = with_native_weights(method, bits=bits)
        gap[bits] = float((served(model, batch) - reference).abs().max())
    assert gap[8] < 1e-2
    assert gap[2] > 1e-2 > gap[8] > 0
    assert gap[2] > gap[4] > gap[8]


def test_intactkv_pivots_bit_identical_to_native():
    native, model = with_native_weights("intactkv", pivots=2)
    batch = random_batch(LENGTHS, seed=6)
    mem_n, mem_i = native.prefill(*history(batch)), model.prefill(*history(batch))
    quantized_gap = 0.0
    for ln, li, block in zip(mem_n.layers, mem_i.layers, model.blocks):
        n_q = li.payload["k_codes"].shape[1]
        k_i, v_i, pos_i, valid_i = block.mixer.read(li)  # quantized part, then fp32 part
        for b in range(len(LENGTHS)):
            n_hist = 2 * (LENGTHS[b] - 1)
            native_at = {int(p): i for i, p in enumerate(ln.metadata["pos"][b])
                         if ln.metadata["valid"][b, i]}
            assert int(valid_i[b, :n_q].sum()) == max(0, n_hist - 2)  # all but i_1, y_1
            for j in torch.nonzero(valid_i[b]).flatten().tolist():
                p = int(pos_i[b, j])
                kn, vn = ln.payload["k"][b, :, native_at[p]], ln.payload["v"][b, :, native_at[p]]
                if p < 2:  # a pivot: fp32, bit-identical to Native
                    assert j >= n_q and torch.equal(k_i[b, :, j], kn)
                    assert torch.equal(v_i[b, :, j], vn)
                else:
                    assert j < n_q
                    quantized_gap = max(quantized_gap, float((k_i[b, :, j] - kn).abs().max()))
    assert quantized_gap > 1e-3  # the others are really quantized


def test_kivi_groups_keys_per_channel_and_values_per_token():
    _, model = with_native_weights("kivi", group_size=4, residual_length=6)
    memory = model.prefill(*history(random_batch([12], seed=7)))  # 22 tokens
    layer = memory.layers[0]
    # 22 - 6 = 16 tokens quantized (4 groups of 4), 6 kept fp32
    assert layer.payload["k_codes"].shape == (1, 16, 32 * 2 // 8)
    assert layer.payload["k_codes"].dtype == torch.uint8
    assert layer.metadata["k_scale"].shape == (1, 16 // 4, 32)  # per channel, per token group
    assert layer.metadata["v_scale"].shape == (1, 16, 32 // 4)  # per token, per channel group
    assert layer.metadata["k_fp32"].shape == (1, 6, 32)
    assert layer.metadata["pos"].flatten().tolist() == list(range(22))


@pytest.mark.parametrize("method", METHODS)
def test_measured_bytes_equal_closed_form_at_16_bits(method):
    """16 bits keeps fp32 "codes" and no scales: not a declared setting (it keeps as much as
    Native), so the contract tests do not measure it."""
    model = tiny_model(method, layers=2, hparams={**QUANTIZED[method], "bits": 16})
    for n_history in (1, 3, 17):
        measured = measure_user_bytes(model, n_history)
        for metadata, key in ((False, "payload"), (True, "with_metadata")):
            formula = model.method.memory_bytes(model.cfg, model.hp, 2 * n_history, metadata)
            assert measured[key] == 2 * formula, (n_history, metadata)
    assert flop_counter_macs(model, 16, 3) == closed_form_macs(model, 16, 3)["request_matmul"]


def test_paper_payload_figure():
    """32 layers, d = 256, L = 1024 (2046 cached tokens), 2 bits, payload only: 7.99 MiB."""
    from malloc_ray.model.hstu import HSTUConfig

    cfg = HSTUConfig(d_model=256, num_heads=8, num_layers=32, max_len=1024)
    mib = lambda m, **hp: 32 * m.memory_bytes(cfg, m.Hparams(**hp), 2046) / 2**20  # noqa: E731
    kivi, intact = get_method("kivi"), get_method("intactkv")
    assert round(mib(intact), 2) == 7.99  # 2045 quantized tokens + 1 fp32 pivot (metadata)
    assert mib(kivi, residual_length=0) == 32 * 2016 * 2 * 64 / 2**20  # 30 trailing tokens fp32
    assert mib(kivi) == 32 * 1984 * 2 * 64 / 2**20  # R = 32: 62 fp32 tokens
    assert mib(kivi, bits=16, residual_length=0) == 32 * 2016 * 2 * 256 * 4 / 2**20


def kept_positions(layer):
    """Per user: (positions quantized, positions kept fp32)."""
    n_q = layer.payload["k_codes"].shape[1]
    pos, valid = layer.metadata["pos"], layer.metadata["valid"]
    return [(p[:n_q][v[:n_q]].tolist(), p[n_q:][v[n_q:]].tolist()) for p, v in zip(pos, valid)]


@pytest.mark.parametrize("method", METHODS)
def test_append_then_score(method):
    """Prefill + append: at 16 bits it is Native's path exactly; at 2 bits the memory holds
    what a prefill of the whole history holds (same split, same bytes)."""
    batch = random_batch([21, 8, 14, 5, 21, 9], seed=8)  # every user keeps some history
    new = slice(-4, -1)
    for bits in (16, 2):
        native, model = with_native_weights(method, bits=bits)
        outs = []
        for m in (native, model):
            memory = m.prefill(*history(batch, drop=4))
            memory, appended = m.append(memory, batch["items"][:, new], batch["labels"][:, new])
            outs.append((memory, appended, m.score(memory, batch["items"][:, -1:])[:, 0]))
        (_, app_n, score_n), (mem, app_q, score_q) = outs
        if bits == 16:
            torch.testing.assert_close(app_q, app_n, rtol=0, atol=1e-5)
            torch.testing.assert_close(score_q, score_n, rtol=0, atol=1e-5)
        else:
            assert (score_q - score_n).abs().max() > 1e-4
        whole = model.prefill(*history(batch))
        for a, b in zip(mem.layers, whole.layers):
            # the same tokens are quantized and kept fp32 (batch padding may differ)
            assert kept_positions(a) == kept_positions(b)
    # one user: appended memory bytes equal the closed form at the new length
    model = tiny_model(method, layers=2, hparams=QUANTIZED[method])
    one = random_batch([20], seed=9)
    memory = model.prefill(*history(one, drop=6))
    memory, _ = model.append(memory, one["items"][:, -6:-1], one["labels"][:, -6:-1])
    for metadata in (False, True):
        formula = model.method.memory_bytes(model.cfg, model.hp, 38, metadata)
        assert memory.nbytes(metadata) == 2 * formula
