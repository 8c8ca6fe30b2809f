"""Ranking metrics (torchmetrics) against per-user scikit-learn and the numpy rank oracle."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from malloc_ray.metrics.ranking import auc, gauc, logloss, ranking_metrics


def sklearn_gauc(labels, scores, groups):
    """FuxiCTR/DIN gAUC, one user at a time: skip single-class users, weight by sample count."""
    total, weight = 0.0, 0
    for user in np.unique(groups):
        mask = groups == user
        if len(np.unique(labels[mask])) < 2:
            continue
        total += roc_auc_score(labels[mask], scores[mask]) * mask.sum()
        weight += mask.sum()
    return total / weight if weight else float("nan")


def random_case(seed, n=3000, n_users=400):
    """Skewed group sizes (many of size 1), rounded scores (ties), one all-positive, one all-negative user."""
    rng = np.random.default_rng(seed)
    groups = rng.zipf(1.6, n) % n_users + 1000
    probs = np.round(rng.random(n), 1 if seed % 2 else 2)
    labels = (rng.random(n) < 0.2 + 0.6 * probs).astype(np.int64)
    users, sizes = np.unique(groups, return_counts=True)
    big = users[np.argsort(-sizes)[:2]]
    labels[groups == big[0]] = 1
    labels[groups == big[1]] = 0
    return labels, probs, groups


@pytest.mark.parametrize("seed", range(6))
def test_matches_sklearn(seed):
    labels, probs, groups = random_case(seed)
    sizes = np.unique(groups, return_counts=True)[1]
    assert (sizes == 1).any()  # the case really contains singleton groups
    assert auc(labels, probs) == pytest.approx(roc_auc_score(labels, probs), abs=1e-12)
    assert gauc(labels, probs, groups) == pytest.approx(sklearn_gauc(labels, probs, groups), abs=1e-12)
    assert logloss(labels, probs) == pytest.approx(
        log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7)), abs=1e-12)


def test_accepts_torch_and_returns_all_three():
    labels, probs, groups = random_case(7)
    got = ranking_metrics(torch.from_numpy(labels), torch.from_numpy(probs).float(),
                          torch.from_numpy(groups))
    assert set(got) == {"auc", "gauc", "logloss"}
    # float32 probabilities keep ties and order, so the rank metrics are unchanged
    assert got["auc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-12)
    assert got["gauc"] == pytest.approx(sklearn_gauc(labels, probs, groups), abs=1e-12)


def test_all_ties_is_half():
    labels = np.array([0, 1, 0, 1, 1])
    assert auc(labels, np.full(5, 0.3)) == 0.5
    assert gauc(labels, np.full(5, 0.3), np.array([1, 1, 2, 2, 2])) == 0.5


def test_undefined_cases_are_nan_not_errors():
    groups = np.array([1, 1, 2, 3])
    assert math.isnan(gauc(np.array([1, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4]), groups))
    assert math.isnan(auc(np.ones(4), np.arange(4.0)))
    assert math.isnan(auc(np.array([0, 1]), np.array([0.5, np.nan])))


def test_logloss_clips_confident_misses():
    got = logloss(np.array([1, 0]), np.array([0.0, 1.0]), eps=1e-7)
    assert got == pytest.approx(-math.log(1e-7))


def test_rejects_bad_labels():
    with pytest.raises(ValueError):
        auc(np.array([0, 2]), np.array([0.1, 0.2]))


@pytest.mark.parametrize("seed", range(4))
def test_matches_the_numpy_rank_oracle(seed):
    import ranking_oracle

    labels, probs, groups = random_case(seed + 10, n=2000, n_users=150)
    got, want = ranking_metrics(labels, probs, groups), ranking_oracle.ranking_metrics(
        labels, probs, groups)
    assert got.keys() == want.keys()
    for key in got:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def test_empty_input_is_nan_not_a_crash():
    empty = np.array([], dtype=np.int64)
    got = ranking_metrics(empty, empty.astype(float), empty)
    assert all(math.isnan(v) for v in got.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_trial_device():
    labels, probs, groups = random_case(3)
    on_gpu = ranking_metrics(*(torch.from_numpy(x).cuda() for x in (labels, probs, groups)))
    assert on_gpu == pytest.approx(ranking_metrics(labels, probs, groups), abs=1e-9)


def test_scores_outside_zero_one_and_close_scores_keep_their_order():
    """Counts (popularity) and logits are scores too; so are probabilities a float32 would tie."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 500)
    counts = rng.integers(0, 10_000, 500) * 1000.0 + labels * 500.0
    assert auc(labels, counts) == pytest.approx(roc_auc_score(labels, counts), abs=1e-12)
    close = 0.5 + rng.random(500) * 1e-9
    assert auc(labels, close) == pytest.approx(roc_auc_score(labels, close), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_every_groups_auroc_is_torchmetrics_exact_auroc(seed):
    """`group_aurocs` (one sort for all groups) against `auc` group by group, i.e. the area
    under torchmetrics' exact ROC curve of each group: ties, single-class groups (nan there,
    as sklearn raises), groups of one. (torchmetrics' own `binary_auroc` integrates in
    float32: 1e-7 off.)"""
    from malloc_ray.metrics.ranking import group_aurocs

    labels, probs, groups = random_case(seed)
    uniques, codes = np.unique(groups, return_inverse=True)
    y, s = torch.from_numpy(labels).double(), torch.from_numpy(probs).double()
    got, sizes = group_aurocs(y, s, torch.from_numpy(codes), len(uniques))
    assert sizes.tolist() == np.bincount(codes).tolist()
    single = 0
    for g in range(len(uniques)):
        ys, ss = y[codes == g], s[codes == g]
        if ys.min() == ys.max():
            assert math.isnan(got[g]), g
            single += 1
        else:
            assert got[g].item() == pytest.approx(auc(ys, ss), abs=1e-9), g
    assert 0 < single < len(uniques)


def test_gauc_of_no_samples_is_nan():
    assert math.isnan(gauc(np.array([], dtype=int), np.array([]), np.array([], dtype=int)))
