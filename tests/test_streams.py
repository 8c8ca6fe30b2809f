"""Stream evaluation (serving replay) against window evaluation, its oracle where both see the
same inputs, and on every method's append path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixtures import VOCAB, tiny_model

from malloc_ray.config import TrialConfig
from malloc_ray.data.loader import load_dataset, local_batches, select_samples
from malloc_ray.data.prepare import prepare
from malloc_ray.data.streams import stream_batches
from malloc_ray.errors import InputError
from malloc_ray.methods import REGISTRY, get_method, method_names
from malloc_ray.model.ctr import CTRModel
from malloc_ray.model.hstu import HSTUConfig
from malloc_ray.train.loop import evaluate
from malloc_ray.train.trial import batch_factories

MAX_LEN = 40  # the tiny model's; every synthetic history below is shorter


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    """Histories of at most 30 interactions, several valid/test targets per user."""
    out = tmp_path_factory.mktemp("streams") / "d"
    prepare("synthetic", out, profile="kuaivideo", users=40, max_len=30, items=50, seed=3)
    ds = load_dataset(out)
    assert np.diff(ds.offsets).max() <= 30
    return ds


def window_probs(model, ds, split):
    """Window evaluation's probabilities, reordered by (user, target time) as a stream's are."""
    rows = select_samples(ds, split, MAX_LEN)
    probs = torch.cat([model.predict(b) for b in local_batches(ds, split, 7, MAX_LEN)])
    order = np.lexsort((rows["prefix_len"].to_numpy(), rows["user"].to_numpy()))
    return probs[torch.from_numpy(order)]


@pytest.mark.parametrize("method", ["native", "wo_mem"])
@pytest.mark.parametrize("split", ["valid", "test"])
def test_stream_equals_window_when_histories_fit(fits, method, split):
    torch.use_deterministic_algorithms(True)
    model = tiny_model(method, layers=2, seed=1)
    batches = list(stream_batches(fits, split, MAX_LEN, 5))
    stream = torch.cat([model.predict(b) for b in batches])
    # batches group users by target count; within a user, targets are in time order
    by_user = torch.cat([b["eval_users"] for b in batches]).argsort(stable=True)
    stream = stream[by_user]
    window = window_probs(model, fits, split)
    assert stream.shape == window.shape and len(stream) > fits.meta["stats"]["users"]
    torch.testing.assert_close(stream, window, atol=1e-6, rtol=0)
    got = evaluate(model, stream_batches(fits, split, MAX_LEN, 5))
    want = evaluate(model, local_batches(fits, split, 7, MAX_LEN))
    for key in ("auc", "gauc", "logloss", "n"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


def test_history_is_capped_so_the_last_target_sees_at_most_max_len_minus_one(fits):
    short = 8
    for batch in stream_batches(fits, "test", short, 64):
        k = batch["target_mask"].sum(1)
        assert (batch["lengths"] <= torch.clamp(short - k, min=1)).all()
        assert (batch["lengths"] >= 1).all()


@pytest.mark.parametrize("method", method_names())
def test_every_method_serves_a_stream(fits, method):
    """Each method's append path runs (H2O/SnapKV evict, KIVI flushes its residual, Beacon
    condenses, RWKV steps) at a setting where it compresses; one probability per target."""
    setting = REGISTRY[method].test_settings[0]
    model = tiny_model(method, layers=2, hparams=setting.hparams)
    if REGISTRY[method].workflow == "post-hoc":  # on Native's weights, as in a study
        model.load_state_dict(tiny_model("native", layers=2).state_dict())
    batches = list(stream_batches(fits, "valid", MAX_LEN, 8))
    probs = torch.cat([model.predict(b) for b in batches])
    assert probs.shape == (sum(int(b["target_mask"].sum()) for b in batches),)
    assert torch.isfinite(probs).all() and ((probs > 0) & (probs < 1)).all()


@pytest.mark.parametrize("method", [m for m in method_names()
                                    if REGISTRY[m].appends_in_batches()])
def test_a_stream_appended_in_one_step_equals_one_step_per_target(fits, method):
    """The one-step stream of a `batched_append` method scores every target as one append per
    target does, over batches of users with different target counts."""
    setting = REGISTRY[method].test_settings[0]
    model = tiny_model(method, layers=2, hparams=setting.hparams)
    batches = list(stream_batches(fits, "valid", MAX_LEN, 8))
    assert len({b["targets"].shape[1] for b in batches}) > 1
    batched = torch.cat([model.predict_stream(b) for b in batches])
    single = torch.cat([model.predict_stream(b, batched=False) for b in batches])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=0)


def test_capped_histories_append_nothing_past_max_len(fits):
    """Histories longer than the cap, users with different target counts: a batch holds one
    target count, so no padded target is appended past a user's cap (it would sit at position
    2 max_len or later, which Linformer's position-indexed projection does not have)."""
    cap = 12
    assert np.diff(fits.offsets).max() > cap
    cfg = HSTUConfig(d_model=32, num_heads=4, num_layers=2, max_len=cap, dropout=0.0)
    torch.manual_seed(0)
    model = CTRModel(cfg, get_method("linformer"), VOCAB, hparams={"k": 7}).eval()
    batches = list(stream_batches(fits, "valid", cap, 8))
    assert len({b["targets"].shape[1] for b in batches}) > 1
    assert all(bool(b["target_mask"].all()) for b in batches)
    probs = torch.cat([model.predict(b) for b in batches])
    assert len(probs) == sum(b["target_mask"].numel() for b in batches)
    assert torch.isfinite(probs).all()


def test_protocol_is_a_trial_setting_and_refuses_candidate_datasets(fits, tmp_path):
    cfg = TrialConfig(dataset=str(tmp_path), eval_protocol="stream", max_len=MAX_LEN)
    _, valid, _ = batch_factories(cfg, fits)
    assert "targets" in next(iter(valid()))
    with pytest.raises(InputError) as err:
        TrialConfig(dataset=str(tmp_path), eval_protocol="replay")
    assert err.value.key == "eval_protocol"
    seqs = tmp_path / "seq.txt"
    seqs.write_text("".join(f"{u} " + " ".join(str(1 + (u * 7 + j) % 30) for j in range(12))
                            + "\n" for u in range(1, 21)))
    prepare("sequences", tmp_path / "cand", path=str(seqs), negatives=1, seed=0)
    with pytest.raises(InputError, match="candidates"):
        next(stream_batches(load_dataset(tmp_path / "cand"), "valid", MAX_LEN, 4))


def test_the_report_states_the_protocol():
    from malloc_ray.report.headline import evaluation_words

    assert "window protocol" in evaluation_words({})
    assert "stream protocol" in evaluation_words({"eval_protocol": "stream"})
