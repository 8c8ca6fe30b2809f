"""Uncertainty over seeds (malloc_ray/study/stats.py), checked against scipy's own t tests on
random tables: intervals, paired differences, verdicts and when a "best" mark is earned."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from malloc_ray.report import tables
from malloc_ray.study import pareto, stats


def _table(rng, methods=("native", "h2o", "mqa"), seeds=5, depth=2, shift=None):
    shift = shift or {}
    rows = []
    for s in range(seeds):
        base = rng.normal(0.65, 0.01)  # a seed effect shared by every method of that seed
        for m in methods:
            rows.append({"dataset": "d", "method": m, "hparams": "{}", "depth": depth,
                         "seed": s, "status": "ok", "category": "none", "workflow": "trained",
                         "auc": base + shift.get(m, 0.0) + rng.normal(0, 0.003),
                         "gauc": base + shift.get(m, 0.0) + rng.normal(0, 0.003),
                         "logloss": 0.6 + rng.normal(0, 0.01),
                         "macs_per_request": 1.0, "kv_bytes_per_user": 1.0,
                         "kv_payload_bytes_per_user": 1.0})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed", range(5))
def test_interval_matches_scipy_one_sample_t(seed):
    x = np.random.default_rng(seed).normal(0.6, 0.05, 2 + seed)
    ci = scipy_stats.ttest_1samp(x, 0.0).confidence_interval(0.95)
    assert stats.ci95(x) == pytest.approx((ci.high - ci.low) / 2)
    assert np.isnan(stats.ci95(x[:1]))  # one seed: no interval


@pytest.mark.parametrize("seed", range(5))
def test_paired_delta_matches_scipy_paired_t(seed):
    rng = np.random.default_rng(seed)
    table = _table(rng, shift={"h2o": rng.normal(0, 0.01)})
    table.loc[(table.method == "mqa") & (table.seed == 0), "status"] = "error"  # not paired
    summary = pareto.summarize(table).set_index("method")
    for method in ("h2o", "mqa"):
        ok = table[table.status == "ok"].pivot(index="seed", columns="method", values="gauc")
        pair = ok[[method, "native"]].dropna()
        res = scipy_stats.ttest_rel(pair[method], pair["native"])
        ci = res.confidence_interval(0.95)
        row = summary.loc[method]
        assert row["n_pairs_vs_native"] == len(pair)
        assert row["delta_gauc_vs_native"] == pytest.approx((pair[method] - pair["native"]).mean())
        assert row["delta_gauc_vs_native_ci95"] == pytest.approx((ci.high - ci.low) / 2)
        want = "better" if ci.low > 0 else "worse" if ci.high < 0 else "≈"
        assert row["verdict_vs_native"] == want
    assert summary.loc["native", "verdict_vs_native"] == "n/a"
    ci = scipy_stats.ttest_1samp(table[(table.method == "h2o")]["auc"], 0).confidence_interval()
    assert summary.loc["h2o", "auc_ci95"] == pytest.approx((ci.high - ci.low) / 2)


def test_verdict_flips_only_when_the_interval_excludes_zero():
    assert stats.verdict(0.010, 0.011) == "≈"
    assert stats.verdict(0.010, 0.009) == "better"
    assert stats.verdict(-0.010, 0.009) == "worse"
    assert stats.verdict(-0.010, 0.010) == "≈"  # touching 0 is not excluding it
    assert stats.verdict(0.5, float("nan")) == "n/a"  # one pair: no interval, no finding
    assert stats.verdict(-0.010, 0.009, higher_is_better=False) == "better"


def test_a_real_shift_is_found_and_noise_is_not():
    rng = np.random.default_rng(7)
    summary = pareto.summarize(_table(rng, shift={"h2o": -0.03}, seeds=4)).set_index("method")
    assert summary.loc["h2o", "verdict_vs_native"] == "worse"
    assert summary.loc["mqa", "verdict_vs_native"] == "≈"


def test_one_seed_has_no_interval_and_no_verdict():
    summary = pareto.summarize(_table(np.random.default_rng(1), seeds=1)).set_index("method")
    assert summary["gauc_ci95"].isna().all()
    assert (summary["verdict_vs_native"] == "n/a").all()
    assert stats.fmt_interval(0.65, float("nan"), 1) == "0.6500 (1 seed, no interval)"


def test_best_is_marked_only_when_intervals_do_not_overlap():
    assert stats.separated_best([0.70, 0.65, 0.60], [0.01, 0.01, 0.01]).tolist() == \
        [True, False, False]
    assert not stats.separated_best([0.70, 0.69, 0.60], [0.01, 0.01, 0.01]).any()  # overlap
    assert not stats.separated_best([0.70, 0.60], [float("nan"), 0.01]).any()  # one seed
    assert stats.separated_best([0.3, 0.5], [0.05, 0.05], higher_is_better=False).tolist() == \
        [True, False]
    rng = np.random.default_rng(3)
    for _ in range(200):
        m, h = rng.uniform(0.5, 0.7, 4), rng.uniform(0.0, 0.05, 4)
        mask = stats.separated_best(m, h)
        i, j = np.argsort(-m)[:2]
        assert mask.sum() <= 1
        assert mask[i] == (m[i] - h[i] > m[j] + h[j])


@pytest.mark.parametrize("seed", range(3))
def test_depth_delta_matches_scipy_paired_t_over_seeds(seed):
    """Going deeper is paired by seed like a method against Native; a real gain is 'better',
    and a seed missing at either depth drops out of the pairs."""
    rng = np.random.default_rng(seed)
    table = pd.concat([_table(rng, depth=1, seeds=4),
                       _table(rng, depth=2, seeds=4, shift={"native": 0.05, "h2o": 0.05}),
                       _table(rng, depth=4, seeds=4)], ignore_index=True)
    table.loc[(table.method == "mqa") & (table.depth == 4) & (table.seed == 1), "status"] = "oom"
    deltas = stats.depth_deltas(table).set_index(["method", "depth"])
    assert sorted(deltas.index) == [(m, d) for m in ("h2o", "mqa", "native") for d in (2, 4)]
    for (method, depth), row in deltas.iterrows():
        ok = table[(table.status == "ok") & (table.method == method)]
        pair = ok.pivot(index="seed", columns="depth", values="gauc")[[depth, 1]].dropna()
        ci = scipy_stats.ttest_rel(pair[depth], pair[1]).confidence_interval(0.95)
        assert row["base_depth"] == 1 and row["n_pairs"] == len(pair)
        assert row["delta"] == pytest.approx((pair[depth] - pair[1]).mean())
        assert row["delta_ci95"] == pytest.approx((ci.high - ci.low) / 2)
    assert deltas.loc[("mqa", 4), "n_pairs"] == 3
    effect = tables.depth_effect(table, pareto.summarize(table))
    verdicts = effect.raw.set_index(["method", "depth"])["verdict"]
    assert verdicts[("native", 2)] == "better" and verdicts[("h2o", 2)] == "better"
    line = next(s for s in effect.markdown().splitlines() if s.startswith("| d | native | 2 |"))
    assert "better" in line and "(depth 1)" in line


def test_one_depth_has_no_depth_effect():
    table = _table(np.random.default_rng(0), depth=2)
    assert stats.depth_deltas(table).empty
    effect = tables.depth_effect(table, pareto.summarize(table))
    assert effect.display.empty and "One depth only" in effect.note
