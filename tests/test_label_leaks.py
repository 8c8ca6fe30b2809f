"""Datasets must not leak the label through their structure (docs/data.md, "Label-stream audit").

HSTU sees every earlier label, so DIN's Amazon rows laid out as the sequence r0, n1, r1, n2, ...
(label stream 1, 0, 1, 0, ...) hand a model the target's label through its position. The old
construction is kept here as a fixture: the audit must flag it and a model must exploit it (so
the probe can fail), while the candidate-only form (negatives scored, never in the history) and
the sequence reader on real Toys data carry nothing.
"""

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
import reczoo_fixtures as fx
from reczoo_fixtures import amazon_reviews, write_amazon_x1

from malloc_ray import cli
from malloc_ray.config import TrialConfig
from malloc_ray.data.loader import load_dataset, local_batches
from malloc_ray.data.prepare import prepare, write_dataset
from malloc_ray.data.sources import SOURCES, read_amazon_x1
from malloc_ray.methods import get_method
from malloc_ray.model.ctr import CTRModel
from malloc_ray.model.hstu import HSTUConfig
from malloc_ray.train.trial import run_trial

TOYS = SHARED_DATA / "amazon-toys-s3rec" / "Toys_and_Games.txt"
TINY = dict(depth=2, d_model=32, num_heads=4, max_len=32, batch_size=32, lr=3e-3, epochs=3,
            patience=2, dropout=0.0, seed=0)


@pytest.fixture(scope="module")
def amazon_dir(tmp_path_factory):
    """DIN's AmazonElectronics_x1 rows for 400 users, and the truth of the old construction."""
    d = tmp_path_factory.mktemp("amz") / "AmazonElectronics_x1"
    truth = write_amazon_x1(d, amazon_reviews(400, seed=3), seed=3)
    return d, truth


@pytest.fixture(scope="module")
def rebuilt(amazon_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "amazon"
    return str(out), prepare("amazon_x1", out, path=str(amazon_dir[0]))


@pytest.fixture(scope="module")
def interleaved(amazon_dir, tmp_path_factory):
    """The old construction: every negative row put into the history before review r_i."""
    out = tmp_path_factory.mktemp("ds") / "amazon-interleaved"
    log = dataclasses.replace(read_amazon_x1(amazon_dir[0]), candidate=None)
    with pytest.warns(UserWarning, match="label_stream_auc"):
        meta = write_dataset(log, out, name="amazon-interleaved", source={"kind": "test"})
    return str(out), meta


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    """The first 1000 users of the real Toys sequences (training on all 19k takes many minutes
    on a 2-core machine)."""
    if not TOYS.is_file():
        pytest.skip(f"real data not available at {TOYS}")
    d = tmp_path_factory.mktemp("toys")
    with TOYS.open() as f:
        (d / "toys1000.txt").write_text("".join(itertools.islice(f, 1000)))
    out = d / "ds"
    return str(out), prepare("sequences", out, path=str(d / "toys1000.txt"), negatives=1)


def _source_inputs(d):
    """Source name -> prepare options on a small input in its format."""
    csv = d / "log.csv"
    _write_interleaved_csv(csv, fx.paper_truth("kuaivideo", 20, max_len=40))
    (d / "seqs.txt").write_text("".join(f"{u} {u} {u + 1} {u + 2} {u + 3}\n" for u in range(1, 40)))
    (d / "log.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n" +
                                 "".join(f"{u}\t{i}\t{1 + (u * i * 7 + i // 3) % 5}\t{i}\n"
                                         for u in range(1, 60) for i in range(1, 22)))
    truth = fx.paper_truth("kuaivideo", 12, max_len=60)
    fx.write_kuaivideo_x1(d / "kuai", truth)
    fx.write_microvideo_x1(d / "micro", fx.paper_truth("microvideo", 12, max_len=60))
    write_amazon_x1(d / "amz", amazon_reviews(20))
    fx.write_longctr_x2(d / "x2", truth)
    return {"synthetic": {"profile": "amazon", "users": 50}, "interactions": {"path": str(csv)},
            "movielens": {"path": str(d / "log.inter")}, "kuaivideo_x1": {"path": str(d / "kuai")},
            "microvideo_x1": {"path": str(d / "micro")}, "amazon_x1": {"path": str(d / "amz")},
            "longctr_x2": {"path": str(d / "x2")}, "sequences": {"path": str(d / "seqs.txt")}}


def test_every_source_records_the_audit(tmp_path):
    inputs = _source_inputs(tmp_path)
    assert set(inputs) == set(SOURCES)  # a new source gets a line here
    for source, options in inputs.items():
        meta = prepare(source, tmp_path / f"out-{source}", **options)
        assert 0.0 <= meta["stats"]["label_stream_auc"] <= 1.0, source


def test_interleaved_construction_is_flagged(interleaved):
    assert interleaved[1]["stats"]["label_stream_auc"] >= 0.95


def test_candidate_only_datasets_carry_nothing_in_their_label_stream(rebuilt, toys):
    for _, meta in (rebuilt, toys):
        assert meta["candidates"] is True
        assert meta["stats"]["label_stream_auc"] <= 0.55
        assert 0.45 <= meta["stats"]["positive_rate"] <= 0.55  # one negative per positive


def _write_interleaved_csv(path, truth):
    rows = [f"{u},{i},{t},{y}" for t, (u, i, y) in
            enumerate(zip(truth.user.tolist(), truth.item.tolist(), truth.label.tolist()))]
    path.write_text("user,item,timestamp,label\n" + "\n".join(rows) + "\n")


def test_cli_warns_and_strict_fails_on_the_interleaved_construction(amazon_dir, tmp_path, capsys):
    csv = tmp_path / "interleaved.csv"
    _write_interleaved_csv(csv, amazon_dir[1])
    out = tmp_path / "ds"
    assert cli.main(["data", "prepare", "interactions", str(csv), "--out", str(out)]) == 0
    assert "warning: dataset 'interleaved': label_stream_auc" in capsys.readouterr().err
    strict = tmp_path / "strict"
    assert cli.main(["data", "prepare", "interactions", str(csv), "--out", str(strict),
                     "--strict"]) == 2
    err = capsys.readouterr().err
    assert "label_stream_auc" in err and "--strict" in err
    assert not strict.exists() and not list(tmp_path.glob("strict.tmp-*"))


def test_data_stats_shows_the_audit(rebuilt, capsys):
    assert cli.main(["data", "stats", rebuilt[0]]) == 0
    table = capsys.readouterr().out
    assert "Label-stream AUC" in table
    assert f"{rebuilt[1]['stats']['label_stream_auc']:.3f}" in table


@pytest.mark.slow
def test_a_model_reads_the_label_off_the_interleaved_construction(interleaved):
    """The probe can fail: on the leaking layout Native's AUC is near perfect."""
    result = run_trial(TrialConfig(dataset=interleaved[0], method="native", **TINY))
    assert result["auc"] > 0.99, result["auc"]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["rebuilt", "toys"])
def test_native_on_candidate_only_data_learns_without_reading_labels(which, request):
    path, _ = request.getfixturevalue(which)
    # Toys windows are full width (32): a capped epoch keeps this test near a minute
    steps = {"max_steps_per_epoch": 150} if which == "toys" else {}
    result = run_trial(TrialConfig(dataset=path, method="native", loss_positions="last",
                                   **TINY, **steps))
    assert result["status"] in ("ok", "no_learning"), result.get("reason")
    assert result["auc"] <= 0.99, result["auc"]


@pytest.mark.parametrize("which", ["rebuilt", "toys"])
def test_cached_scoring_of_candidates_equals_recompute(which, request):
    """The candidate sits in the window's last column; Native's prefill + score must equal
    w/o Mem's recompute on the same weights for positives and negatives alike."""
    path, _ = request.getfixturevalue(which)
    ds = load_dataset(path)
    torch.manual_seed(0)
    cfg = HSTUConfig(d_model=32, num_heads=4, num_layers=2, max_len=32, dropout=0.0)
    native = CTRModel(cfg, get_method("native"), ds.meta["vocab_size"]).eval()
    recompute = CTRModel(cfg, get_method("wo_mem"), ds.meta["vocab_size"]).eval()
    recompute.load_state_dict(native.state_dict())
    batches = itertools.islice(local_batches(ds, "valid", 64, 32), 4)
    for batch in batches:
        assert (batch["labels"][:, -1] == 0).any() and (batch["labels"][:, -1] == 1).any()
        torch.testing.assert_close(native.predict(batch), recompute.predict(batch),
                                   rtol=0, atol=1e-6)
    assert np.isfinite(ds.samples["candidate"]).all()
