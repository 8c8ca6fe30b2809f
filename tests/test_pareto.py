"""Pareto sets against a brute-force definition, and seed aggregation with failed cells."""

import itertools

import numpy as np
import pandas as pd
import pytest

from malloc_ray.study.pareto import FRONTS, non_dominated, pareto_table, summarize
from report_fixtures import FAILURES, fake_results
from malloc_ray.study.results import build_table


def brute_force(values, senses):
    """Literal definition: i is kept unless some j is ≥ everywhere and > somewhere."""
    def better_eq(a, b, s):
        return a >= b if s == "max" else a <= b

    def strictly(a, b, s):
        return a > b if s == "max" else a < b

    n = len(values)
    keep = []
    for i in range(n):
        dominated = any(
            all(better_eq(values[j][k], values[i][k], s) for k, s in enumerate(senses))
            and any(strictly(values[j][k], values[i][k], s) for k, s in enumerate(senses))
            for j in range(n) if j != i)
        keep.append(not dominated)
    return np.array(keep)


@pytest.mark.parametrize("seed", range(20))
def test_non_dominated_equals_brute_force_on_random_tables(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 40)), int(rng.integers(2, 4))
    # Few distinct values, so ties and duplicate points occur.
    values = rng.integers(0, 6, size=(n, k)).astype(float)
    senses = list(rng.choice(["max", "min"], size=k))
    assert (non_dominated(values, senses) == brute_force(values.tolist(), senses)).all()


def test_fronts_of_random_study_tables_equal_brute_force():
    rng = np.random.default_rng(7)
    table = build_table(fake_results(seed=3))
    # Random metric values per cell, so the fronts are not staged.
    ok = table["status"] == "ok"
    table.loc[ok, "gauc"] = rng.uniform(0.5, 0.7, ok.sum()).round(2)
    for per_depth in (False, True):
        summary = pareto_table(table, per_depth=per_depth)
        groups = ["dataset", "depth"] if per_depth else ["dataset"]
        for _, part in summary.groupby(groups):
            usable = part[part["n_ok"] > 0]
            for name, objectives in FRONTS.items():
                cols, senses = [c for c, _ in objectives], [s for _, s in objectives]
                expected = brute_force(usable[cols].to_numpy().tolist(), senses)
                assert (usable[f"front_{name}"].to_numpy() == expected).all(), (name, per_depth)
            assert not part.loc[part["n_ok"] == 0, [f"front_{n}" for n in FRONTS]].any().any()


def test_summary_averages_ok_seeds_only_and_lists_failures():
    table = build_table(fake_results())
    summary = summarize(table).set_index(["dataset", "method", "depth"])
    # mqa depth 4: seed 1 diverged -> the mean is seed 0's value alone
    row = summary.loc[("kuai", "mqa", 4)]
    seed0 = table[(table.dataset == "kuai") & (table.method == "mqa") & (table.depth == 4)
                  & (table.seed == 0)]
    assert row["n_ok"] == 1 and row["n_failed"] == 1 and row["failed_statuses"] == "diverged"
    assert row["gauc"] == pytest.approx(float(seed0["gauc"].iloc[0]))
    # kivi depth 4: both seeds failed -> listed, no coordinates, never on a front
    both = pareto_table(table).set_index(["dataset", "method", "depth"]).loc[("kuai", "kivi", 4)]
    assert both["n_ok"] == 0 and both["failed_statuses"] == "error,oom"
    assert pd.isna(both["gauc"]) and not both["front_gauc_macs"]
    n_cells = len(list(itertools.product(["kuai", "amazon"], range(5), (1, 4))))
    assert len(summary) == n_cells
    assert summary["n_failed"].sum() == 2 * len(FAILURES)


def test_non_dominated_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        non_dominated(np.array([[0.5, np.nan]]), ["max", "min"])
