"""Models learn: every registered method on the synthetic amazon profile, and Native against
item popularity on real MovieLens-100K.

These train real (tiny) models on CPU, so they are among the slowest tests of the suite.
Native's use of long history (full window vs the last 8 interactions on the kuaivideo profile)
takes about two minutes to train to a clear margin; it is a documented command in
docs/results.md, run and checked (margin and recorded figures) by tests/test_docs_pages.py.
"""

from pathlib import Path

import pytest

from malloc_ray.config import TrialConfig
from malloc_ray.data.loader import load_dataset
from malloc_ray.data.prepare import prepare
from malloc_ray.methods import REGISTRY, method_names
from malloc_ray.train.baselines import popularity_baseline
from malloc_ray.train.trial import run_trial

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k" / "ml-100k.inter"

TINY = dict(depth=2, d_model=32, num_heads=4, max_len=32, batch_size=32, lr=3e-3, epochs=8,
            patience=3, dropout=0.0, seed=0)


@pytest.fixture(scope="module")
def amazon(tmp_path_factory):
    """The amazon profile (short histories, per-user click propensity and liked categories):
    learnable by a tiny model in seconds."""
    out = tmp_path_factory.mktemp("data") / "amazon"
    prepare("synthetic", out, profile="amazon", users=2000, seed=0)
    return str(out)


@pytest.fixture(scope="module")
def native_checkpoint(amazon, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "native.pt"
    result = run_trial(TrialConfig(dataset=amazon, method="native", **TINY), save_checkpoint=path)
    return path, result


@pytest.mark.slow
@pytest.mark.parametrize("method", method_names())
def test_every_method_learns_the_synthetic_profile(method, amazon, native_checkpoint):
    checkpoint, native_result = native_checkpoint
    if method == "native":
        result = native_result
    elif REGISTRY[method].workflow == "post-hoc":
        result = run_trial(TrialConfig(dataset=amazon, method=method, **TINY),
                           native_checkpoint=checkpoint)
        assert result["epochs_run"] == 0  # applied to Native's weights, never trained
    else:
        result = run_trial(TrialConfig(dataset=amazon, method=method, **TINY))
    assert result["status"] == "ok", result.get("reason")
    assert result["auc"] >= 0.6, (method, result["auc"])


@pytest.mark.slow
@pytest.mark.skipif(not ML100K.exists(), reason="../shared/data/ml-100k is absent")
def test_native_beats_item_popularity_on_ml100k(tmp_path):
    out = tmp_path / "ml100k"
    prepare("movielens", out, path=str(ML100K))
    # stream: one prefill per user instead of one window per target (58 s -> 17 s for this
    # training on the 2-core machine, test AUC equal to 1e-3, 2026-12-03); the claim is about
    # learning, not the protocol
    result = run_trial(TrialConfig(dataset=str(out), method="native", eval_protocol="stream",
                                   **{**TINY, "max_len": 64, "epochs": 4}))
    baseline = popularity_baseline(load_dataset(out))
    assert result["auc"] > baseline["auc"], (result["auc"], baseline)
