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
def test_a_stopped_trained_phase_stops_the_study_before_post_hoc_cells(tmp_path, capsys,
                                                                         monkeypatch, local_ray):
    """Tune stopped (Ctrl-C) with trained cells left: no post-hoc cell runs on weights that do
    not exist (they used to become `error` rows), and the CLI says how to go on, exit 130."""
    from malloc_ray.study import run

    phases = []
    monkeypatch.setattr(run, "run_phase", lambda name, *a: phases.append(name))  # runs nothing
    spec = {"name": "stop", "output_dir": str(tmp_path / "runs"),
            "datasets": {"syn": {"prepare": {"source": "synthetic", "profile": "kuaivideo",
                                             "users": 40, "max_len": 16, "seed": 0}}},
            "methods": ["native", "h2o"], "depths": [1], "seeds": [0],
            "trial": {**TINY_TRIAL, "loader": "local"}, "resources": {"cpus_per_trial": 1}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    code = cli.main(["study", "run", str(path), "--no-report"])
    err = capsys.readouterr().err
    assert code == 130 and phases == ["trained"], err[-2000:]
    assert "1 of 1 trained cells have no result" in err and "study resume" in err
    assert not list((tmp_path / "runs" / "stop" / "trials").glob("*.json"))


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
