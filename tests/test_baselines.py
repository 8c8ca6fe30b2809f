"""Baselines: the same samples as the model, cooc fit on train prefixes only, peers via the
optional extra [peers] (torch-rechub), one JSON shape for all."""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest

from malloc_ray import cli
from malloc_ray.data.loader import collate_rows, load_dataset, select_samples
from malloc_ray.data.prepare import last_train_prefix, prepare, write_dataset
from malloc_ray.data.sources.interactions import InteractionLog
from malloc_ray.metrics.ranking import auc
from malloc_ray.train.baselines import BASELINES, cooc_scores, fit_cooc, run_baseline
from malloc_ray.train.peers import EXTRA_HINT, export_ctr_inputs

JSON_KEYS = ["baseline", "split", "auc", "gauc", "logloss", "n"]


@pytest.fixture(scope="module")
def amazon(tmp_path_factory):
    out = tmp_path_factory.mktemp("baselines") / "amazon"
    prepare("synthetic", out, profile="amazon", users=40, seed=0)
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Users each like the items of one of 10 clusters; their other interactions are
    uniformly random items, labelled 0. Labels are coin flips, so the label stream and the
    items' popularity carry nothing; only which items co-occur does."""
    rng = np.random.default_rng(0)
    clusters, per_cluster, users, length = 10, 8, 200, 30
    user, item, label = [], [], []
    for u in range(users):
        mine = rng.integers(clusters) * per_cluster + np.arange(per_cluster)
        y = rng.integers(0, 2, length)
        user += [u] * length
        item += list(np.where(y == 1, rng.choice(mine, length),
                              rng.integers(0, clusters * per_cluster, length)))
        label += list(y)
    log = InteractionLog(user=np.array(user, np.int64), item=np.array(item, np.int64),
                         label=np.array(label, np.int8),
                         ts=np.tile(np.arange(length, dtype=np.int64), users))
    out = tmp_path_factory.mktemp("baselines") / "planted"
    write_dataset(log, out, name="planted", source={"kind": "test"})
    return out


def _eval_positions(ds):
    lengths = np.diff(ds.offsets)
    position = np.arange(len(ds.items)) - np.repeat(ds.offsets[:-1], lengths)
    return position > np.repeat(last_train_prefix(lengths), lengths)


def test_cooc_counts_ignore_valid_and_test_targets(amazon):
    ds = load_dataset(amazon)
    fitted = fit_cooc(ds, window=8)
    assert fitted.counts.sum() > 0
    evals = _eval_positions(ds)
    assert evals.any()
    rng = np.random.default_rng(1)
    changed = copy.deepcopy(ds)
    changed.arrays.items[evals] = rng.integers(1, ds.meta["vocab_size"], evals.sum())
    changed.arrays.labels[evals] = 1 - changed.arrays.labels[evals]
    refit = fit_cooc(changed, window=8)
    np.testing.assert_array_equal(refit.keys, fitted.keys)
    np.testing.assert_array_equal(refit.counts, fitted.counts)
    np.testing.assert_array_equal(refit.popularity, fitted.popularity)
    # the check can fail: a train interaction changed does change the counts
    train_pos = np.flatnonzero(~evals & (ds.labels == 1))[5]
    changed.arrays.items[train_pos] = ds.items[train_pos] % (ds.meta["vocab_size"] - 1) + 1
    other = fit_cooc(changed, window=8)
    assert not (np.array_equal(other.keys, fitted.keys)
                and np.array_equal(other.counts, fitted.counts))


def test_cooc_beats_random_and_popularity_on_planted_cooccurrence(planted):
    ds = load_dataset(planted)
    cooc = run_baseline("cooc", ds, "test", max_len=16)
    popularity = run_baseline("popularity", ds, "test")
    rows = select_samples(ds, "test", max_len=16)
    _, labels = ds.targets(rows)
    random_auc = auc(labels, np.random.default_rng(0).random(len(rows)))
    assert cooc["n"] == popularity["n"] == len(rows)
    assert cooc["auc"] > 0.8 > random_auc + 0.2, (cooc, random_auc)
    assert cooc["auc"] > popularity["auc"] + 0.2, (cooc, popularity)
    # the history window is an input (it may reach valid targets); the scores are finite
    assert np.isfinite(cooc_scores(ds, rows, fit_cooc(ds, 15))).all()


def test_every_baseline_prints_the_same_json_head(amazon, capsys):
    for kind in ("popularity", "cooc"):
        assert cli.main(["baseline", kind, "--dataset", str(amazon), "--split", "valid"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert list(out)[:len(JSON_KEYS)] == JSON_KEYS and out["baseline"] == kind
        assert out["split"] == "valid" and out["logloss"] is None
        assert out["n"] == len(select_samples(load_dataset(amazon), "valid", max_len=2))
    assert "train_seconds" in out  # cooc is fitted


def test_cli_choices_are_the_baselines():
    sub = cli.build_parser()._subparsers._group_actions[0].choices["baseline"]
    kind = next(a for a in sub._actions if a.dest == "kind")
    assert tuple(kind.choices) == BASELINES


def test_exporter_windows_are_the_trials(amazon):
    ds = load_dataset(amazon)
    max_len = 6
    x, y, user = export_ctr_inputs(ds, "test", max_len)
    rows = select_samples(ds, "test", max_len)
    batch = collate_rows(ds.arrays, rows, max_len)
    items, labels = batch["items"].numpy(), batch["labels"].numpy()
    assert x["hist_item"].shape == (len(rows), max_len - 1)
    width = items.shape[1] - 1
    np.testing.assert_array_equal(x["hist_item"][:, max_len - 1 - width:], items[:, :-1])
    np.testing.assert_array_equal(x["target_item"], ds.targets(rows)[0])
    np.testing.assert_array_equal(y, ds.targets(rows)[1])
    np.testing.assert_array_equal(user, rows["user"].to_numpy())
    hist_labels = labels[:, :-1]
    np.testing.assert_array_equal(x["hist_pos_item"][:, max_len - 1 - width:],
                                  np.where(hist_labels == 1, items[:, :-1], 0))


@pytest.mark.parametrize("kind", ["din", "bst"])
def test_peer_without_the_extra_exits_2_naming_it(amazon, kind, monkeypatch, capsys):
    # None in sys.modules makes `import torch_rechub` fail as an absent package does
    for name in [m for m in sys.modules if m == "torch_rechub" or m.startswith("torch_rechub.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch_rechub", None)
    assert cli.main(["baseline", kind, "--dataset", str(amazon), "--smoke-test"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "[peers]" in lines[0] and EXTRA_HINT in lines[0], lines


@pytest.mark.parametrize("kind", ["din", "bst"])
def test_peer_smoke_test_runs_on_a_tiny_dataset(amazon, kind, capsys):
    pytest.importorskip("torch_rechub", reason="the optional extra [peers] is not installed")
    code = cli.main(["baseline", kind, "--dataset", str(amazon), "--split", "test",
                     "--smoke-test", "--max-len", "16", "--embed-dim", "8", "--seed", "3"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert list(out)[:len(JSON_KEYS)] == JSON_KEYS and out["baseline"] == kind
    assert out["n"] == len(select_samples(load_dataset(amazon), "test", max_len=16))
    assert 0.0 <= out["auc"] <= 1.0 and np.isfinite(out["logloss"])
    assert out["train_seconds"] > 0 and out["epochs"] == 1 and out["max_len"] == 16
    assert out["library"].startswith("torch-rechub ")


def test_the_library_is_imported_lazily():
    import subprocess

    code = ("import sys, malloc_ray.cli, malloc_ray.train.baselines, malloc_ray.train.peers; "
            "malloc_ray.cli.build_parser(); assert 'torch_rechub' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_count_scores_get_sklearns_auc(planted):
    """Counts are not probabilities; their AUC must still be the rank AUC of the raw counts."""
    sklearn = pytest.importorskip("sklearn.metrics")
    from malloc_ray.train.baselines import train_item_counts

    ds = load_dataset(planted)
    rows = select_samples(ds, "test", max_len=16)
    items, labels = ds.targets(rows)
    counts = train_item_counts(ds)[items] * 1000  # far outside [0, 1]
    ours = run_baseline("popularity", ds, "test")["auc"]
    assert ours == pytest.approx(sklearn.roc_auc_score(labels, counts), abs=1e-9)
    scores = cooc_scores(ds, rows, fit_cooc(ds, 15))
    assert run_baseline("cooc", ds, "test", max_len=16)["auc"] == pytest.approx(
        sklearn.roc_auc_score(labels, scores), abs=1e-9)
