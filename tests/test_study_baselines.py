"""A study's `baselines`: checked with the spec, run once per dataset in the driver, resumable,
in the trials table and the report's Table 2 and findings, never on a front or given a verdict."""

import json

import pandas as pd
import pytest
import yaml

from malloc_ray import cli
from malloc_ray.errors import InputError
from malloc_ray.study.spec import parse_spec, smoke_spec

BASE = {"name": "b", "datasets": {"syn": {"path": "/x"}}, "methods": ["native"]}
TINY_TRIAL = {"d_model": 16, "num_heads": 2, "max_len": 16, "batch_size": 32, "epochs": 1,
              "patience": 1, "loader": "local", "no_learning_margin": None}


def test_spec_accepts_known_baselines_and_smoke_keeps_them():
    spec = parse_spec({**BASE, "baselines": ["popularity", "cooc"]})
    assert spec.baselines == ["popularity", "cooc"]
    assert parse_spec(BASE).baselines == []
    assert smoke_spec(parse_spec({**BASE, "baselines": ["cooc"], "smoke": {"seeds": [0]}})
                      ).baselines == ["cooc"]  # default: the spec's
    assert smoke_spec(parse_spec({**BASE, "baselines": ["cooc"],
                                  "smoke": {"baselines": []}})).baselines == []


@pytest.mark.parametrize("raw, key", [
    ({"baselines": ["nope"]}, "baselines"),
    ({"baselines": "popularity"}, "baselines"),
    ({"baselines": ["cooc", "cooc"]}, "baselines"),
    ({"baselines": [1]}, "baselines"),
    ({"smoke": {"baselines": ["nope"]}}, "smoke.baselines"),
    ({"baselines": ["cooc"], "search": {"mode": "optuna"}}, "baselines"),
])
def test_spec_rejects_bad_baselines_naming_the_key(raw, key):
    with pytest.raises(InputError) as err:
        parse_spec({**BASE, **raw})
    assert err.value.key == key


def test_a_peer_baseline_without_the_extra_fails_at_spec_check(monkeypatch):
    import importlib

    real = importlib.import_module

    def no_rechub(name, *args, **kwargs):
        if name.startswith("torch_rechub"):
            raise ImportError("no torch_rechub", name="torch_rechub")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_rechub)
    with pytest.raises(InputError) as err:
        parse_spec({**BASE, "baselines": ["popularity", "din"]})
    assert err.value.key == "baselines" and "[peers]" in str(err.value)


# ---------------------------------------------------------------- a tiny study (local Ray)

@pytest.mark.slow
def test_a_study_with_baselines_has_their_rows_and_reports_them(tmp_path, capsys, local_ray):
    from malloc_ray.data.loader import load_dataset
    from malloc_ray.study.run import run_study
    from malloc_ray.study.spec import load_spec
    from malloc_ray.train.baselines import cooc_baseline, popularity_baseline

    spec = {"name": "b", "output_dir": str(tmp_path / "runs"),
            "datasets": {"syn": {"prepare": {"source": "synthetic", "profile": "kuaivideo",
                                             "users": 40, "max_len": 16, "seed": 0}}},
            "methods": ["native"], "depths": [1], "seeds": [0], "trial": TINY_TRIAL,
            "baselines": ["popularity", "cooc"], "resources": {"cpus_per_trial": 1}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    code = cli.main(["study", "run", str(path)])
    assert code == 0, capsys.readouterr().err[-3000:]
    study_dir = tmp_path / "runs" / "b"
    table = pd.read_parquet(study_dir / "trials.parquet").set_index("method")
    assert sorted(table.index) == ["cooc", "native", "popularity"]
    assert (table["status"] == "ok").all()
    ds = load_dataset(study_dir / "data" / "syn")
    want = {"popularity": popularity_baseline(ds, "test"),
            "cooc": cooc_baseline(ds, "test", max_len=16)}
    for name, metrics in want.items():
        row = table.loc[name]
        assert (row["category"], row["workflow"], row["depth"], row["seed"]) == (
            "baseline", "baseline", 1, 0)
        assert row["auc"] == pytest.approx(metrics["auc"]) and 0 < row["auc"] < 1
        assert row["gauc"] == pytest.approx(metrics["gauc"], nan_ok=True)
        assert pd.isna(row["logloss"]) and pd.isna(row["kv_bytes_per_user"])
        assert row["trial_id"] != table.loc["native", "trial_id"]

    # one MLflow child run per baseline too
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("b")
    runs = client.search_runs([exp.experiment_id], "tags.`malloc.role` = 'trial'")
    by_hash = {r.data.tags["config_hash"]: r for r in runs}
    assert set(by_hash) == set(table["trial_id"])
    pop = by_hash[table.loc["popularity", "trial_id"]]
    assert pop.data.tags["category"] == "baseline"
    assert pop.data.metrics["test_auc"] == pytest.approx(table.loc["popularity", "auc"])

    # the report: both in Table 2 (never bold, no Δ), in the findings, nowhere on a front
    page = (study_dir / "report" / "report.html").read_text()
    t2 = page[page.index('data-table="table2_depth1"'):]
    t2 = t2[:t2.index("</table>")]
    assert "<td>popularity</td>" in t2 and "<td>cooc</td>" in t2
    front = page[page.index('data-table="pareto"'):]
    front = front[:front.index("</table>")]
    assert "popularity" not in front and "cooc" not in front
    summary = pd.read_csv(study_dir / "report" / "summary.csv",
                          keep_default_na=False).set_index("method")
    for name in want:
        assert summary.loc[name, "verdict_vs_native"] == "n/a"
        assert summary.loc[name, "delta_gauc_vs_native"] == ""
        assert not any(summary.loc[name, c] in (True, "True")
                       for c in summary.columns if c.startswith("front_"))
    t2_csv = pd.read_csv(study_dir / "report" / "tables" / "table2_depth1.csv").set_index(
        "method")
    assert pd.isna(t2_csv.loc["popularity", "syn ΔGAUC vs native"])
    findings = (study_dir / "report" / "findings.md").read_text()
    sentence = next(line for line in findings.splitlines() if line.startswith("Baselines"))
    assert "popularity" in sentence and "cooc" in sentence and "Native" in sentence
    assert f"{table.loc['popularity', 'auc']:.4f}" in sentence

    # resume: nothing left to run; the baselines' result files are not rewritten
    files = {p: p.stat().st_mtime_ns for p in (study_dir / "trials").glob("*.json")}
    capsys.readouterr()
    again = run_study(load_spec(path))
    assert "0 to run" in capsys.readouterr().out
    assert len(again) == 3
    assert {p: p.stat().st_mtime_ns for p in (study_dir / "trials").glob("*.json")} == files
    assert json.loads((study_dir / "trials" / f"{table.loc['cooc', 'trial_id']}.json"
                       ).read_text())["config"]["max_len"] == 16
