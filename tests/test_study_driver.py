"""The one study driver: a sampled Optuna point is resolved as a grid cell is (trial defaults,
hparams, `overrides`, smoke) and recorded the same way."""

import json

import pytest
import yaml

from malloc_ray import cli

TINY_TRIAL = {"d_model": 16, "num_heads": 2, "max_len": 16, "batch_size": 32, "epochs": 1,
              "patience": 1, "loader": "ray", "no_learning_margin": None}


@pytest.mark.slow
def test_an_optuna_study_applies_the_specs_overrides(tmp_path, capsys, local_ray):
    spec = {"name": "o", "output_dir": str(tmp_path / "runs"),
            "datasets": {"syn": {"prepare": {"source": "synthetic", "profile": "kuaivideo",
                                             "users": 40, "max_len": 16, "seed": 0}}},
            "methods": ["native"], "depths": [1], "seeds": [0], "trial": TINY_TRIAL,
            "overrides": [{"match": {"method": "native"}, "set": {"d_model": 24}},
                          {"match": {"method": "native", "depth": 2}, "set": {"d_model": 48}}],
            "search": {"mode": "optuna", "num_samples": 1,
                       "space": {"lr": {"loguniform": [1.0e-4, 1.0e-2]}}},
            "resources": {"cpus_per_trial": 1}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    code = cli.main(["study", "run", str(path), "--no-report"])
    assert code == 0, capsys.readouterr().err[-3000:]
    [result] = [json.loads(p.read_text())
                for p in (tmp_path / "runs" / "o" / "trials").glob("*.json")]
    cfg = result["config"]
    assert cfg["d_model"] == 24  # the matching rule; the depth-2 rule matches no sampled point
    assert cfg["num_heads"] == 2 and 1e-4 <= cfg["lr"] <= 1e-2  # trial defaults, sampled lr
    assert cfg["loader"] == "ray"  # the driver materialized the rows the resolved config reads
    assert result["status"] == "ok", result.get("reason")


@pytest.mark.slow
def test_a_stopped_study_names_what_is_left_and_exits_130(tmp_path, capsys, monkeypatch,
                                                          local_ray):
    """Tune stopped (Ctrl-C) with cells left: the CLI names them (trained, post-hoc) and how
    to go on, exit 130; no result file is made up for them."""
    from malloc_ray.study import run

    ran = []

    def stopped_at_once(name, spec, records, *args):  # runs nothing, as a stopped Tune run
        ran.append([r["config"]["method"] for r in records])

    monkeypatch.setattr(run, "run_phase", stopped_at_once)
    spec = {"name": "stop", "output_dir": str(tmp_path / "runs"),
            "datasets": {"syn": {"prepare": {"source": "synthetic", "profile": "kuaivideo",
                                             "users": 40, "max_len": 16, "seed": 0}}},
            "methods": ["h2o", "native"], "depths": [1], "seeds": [0],
            "trial": {**TINY_TRIAL, "loader": "local"}, "resources": {"cpus_per_trial": 1}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    code = cli.main(["study", "run", str(path), "--no-report"])
    err = capsys.readouterr().err
    assert code == 130 and ran == [["native", "h2o"]], err[-2000:]  # one run, trained first
    assert "2 of 2 cells have no result (1 trained, 1 post-hoc)" in err and "study resume" in err
    assert not list((tmp_path / "runs" / "stop" / "trials").glob("*.json"))


def _cells(*names: str) -> list[dict]:
    """Records as the driver makes them: 'n0' trained Native cells, 'h0' their post-hoc cells
    (the digit names the twin)."""
    out = []
    for name in names:
        rec = {"name": name, "trial_id": name,
               "workflow": "post-hoc" if name[0] == "h" else "trained"}
        if name[0] == "h":
            rec["twin_id"] = "n" + name[1:]
        out.append(rec)
    return out


def test_post_hoc_cells_start_once_their_native_twin_has_ended():
    from malloc_ray.study.cell_order import CellQueue

    queue = CellQueue(_cells("h1", "n0", "h0", "n1", "h2", "n2", "g0"))
    # trained cells first, by name; then nothing while every twin still runs
    assert [queue.next()["name"] for _ in range(4)] == ["g0", "n0", "n1", "n2"]
    assert queue.next() is None
    queue.finished("n1")  # the second slot frees first: n1's post-hoc cell, not h0's
    assert queue.next()["name"] == "h1" and queue.next() is None
    queue.finished("g0")  # a trained cell that is no twin releases nothing
    assert queue.next() is None
    queue.finished("n0")
    queue.finished("n2")
    assert [queue.next()["name"] for _ in range(2)] == ["h0", "h2"]
    assert queue.next() is CellQueue.DONE


def test_a_twin_finished_before_the_run_does_not_hold_its_post_hoc_cell_back():
    """--retry-failed re-runs a failed post-hoc cell whose Native twin is done: it starts at
    once; a twin that is re-run in this run holds its post-hoc cell back until it ends."""
    from malloc_ray.study.cell_order import CellQueue

    queue = CellQueue(_cells("h0", "h1", "n1"))
    assert [queue.next()["name"] for _ in range(2)] == ["n1", "h0"]
    assert queue.next() is None
    queue.finished("n1")
    assert queue.next()["name"] == "h1" and queue.next() is CellQueue.DONE


def test_the_searcher_hands_tune_the_queue_and_survives_pickling():
    """Tune pickles its search algorithm; trials it suggests are {"cell_name": name}."""
    import pickle

    from ray.tune.search import Searcher

    from malloc_ray.study.cell_order import CellSearcher

    searcher = pickle.loads(pickle.dumps(CellSearcher(_cells("n0", "h0"))))
    assert searcher.set_search_properties(None, None, {})
    assert searcher.suggest("t1") == {"cell_name": "n0"}
    assert searcher.suggest("t2") is None
    searcher.on_trial_complete("t1", error=True)  # however the twin ended
    assert searcher.suggest("t2") == {"cell_name": "h0"}
    assert searcher.suggest("t3") == Searcher.FINISHED


def test_the_searcher_saves_and_restores_its_queue(tmp_path):
    """Tune's experiment checkpoint (JSON): a restored searcher goes on where it was."""
    from malloc_ray.study.cell_order import CellSearcher

    searcher = CellSearcher(_cells("n0", "h0", "n1", "h1"))
    assert searcher.suggest("t1") == {"cell_name": "n0"}
    searcher.on_trial_complete("t1")
    searcher.save(str(tmp_path / "state.json"))
    restored = CellSearcher([])
    restored.restore(str(tmp_path / "state.json"))
    assert [restored.suggest(t) for t in ("t2", "t3", "t4")] == [
        {"cell_name": "n1"}, {"cell_name": "h0"}, None]  # h1 waits for n1
    restored.on_trial_complete("t2")
    assert restored.suggest("t4") == {"cell_name": "h1"}


def test_the_multi_objective_sampler_survives_tunes_checkpoint():
    """Tune pickles the search algorithm after every trial; Optuna 5's NSGA-II holds a lock."""
    import pickle

    import optuna

    from malloc_ray.study.nsga2 import PicklableNSGAIISampler

    sampler = pickle.loads(pickle.dumps(PicklableNSGAIISampler(seed=3)))
    with sampler._thread_lock:  # a working lock again after loading
        pass
    assert (sampler._get_generation_key()
            == optuna.samplers.NSGAIISampler._get_generation_key())
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)),
                   n_trials=3)
    assert len(study.trials) == 3
