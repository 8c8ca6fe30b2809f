"""Models learn: every registered method on the synthetic profile, Native's use of long history,
and Native against item popularity on real MovieLens-100K.

These train real (tiny) models on CPU, so they are the slowest tests of the suite.
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

# Depth 2 is the least that can use the planted signal: a label token learns its own item in
# layer 1, and the target matches categories against those label tokens in layer 2.
TINY = dict(depth=2, d_model=32, num_heads=4, max_len=48, batch_size=32, lr=3e-3, epochs=6,
            patience=6, dropout=0.0, seed=0)


@pytest.fixture(scope="module")
def kuai(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "kuai"
    prepare("synthetic", out, profile="kuaivideo", users=400, max_len=48, seed=0)
    return str(out)


@pytest.fixture(scope="module")
def native_checkpoint(kuai, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "native.pt"
    result = run_trial(TrialConfig(dataset=kuai, method="native", **TINY), save_checkpoint=path)
    return path, result


@pytest.mark.slow
@pytest.mark.parametrize("method", method_names())
def test_every_method_learns_the_synthetic_profile(method, kuai, native_checkpoint):
    checkpoint, native_result = native_checkpoint
    if method == "native":
        result = native_result
    elif REGISTRY[method].workflow == "post-hoc":
        result = run_trial(TrialConfig(dataset=kuai, method=method, **TINY),
                           native_checkpoint=checkpoint)
        assert result["epochs_run"] == 0  # applied to Native's weights, never trained
    else:
        result = run_trial(TrialConfig(dataset=kuai, method=method, **TINY))
    assert result["status"] == "ok", result.get("reason")
    assert result["auc"] >= 0.6, (method, result["auc"])


@pytest.mark.slow
def test_native_beats_itself_restricted_to_the_last_8_interactions(kuai, native_checkpoint):
    full = native_checkpoint[1]
    last8 = run_trial(TrialConfig(dataset=kuai, method="native", **{**TINY, "max_len": 9}))
    assert full["auc"] - last8["auc"] >= 0.02, (full["auc"], last8["auc"])


@pytest.mark.slow
@pytest.mark.skipif(not ML100K.exists(), reason="../shared/data/ml-100k is absent")
def test_native_beats_item_popularity_on_ml100k(tmp_path):
    out = tmp_path / "ml100k"
    prepare("movielens", out, path=str(ML100K))
    result = run_trial(TrialConfig(dataset=str(out), method="native",
                                   **{**TINY, "max_len": 64, "epochs": 4}))
    baseline = popularity_baseline(load_dataset(out))
    assert result["auc"] > baseline["auc"], (result["auc"], baseline)
