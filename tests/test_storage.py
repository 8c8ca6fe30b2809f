"""Shared storage on a multi-node cluster: the study refuses a local output before any trial
launches, and says what to set; where Tune and MLflow write follows flag > spec > env."""

from pathlib import Path

import pytest
import yaml

from malloc_ray import cli
from malloc_ray.errors import InputError
from malloc_ray.study.spec import parse_spec
from malloc_ray.study.storage import check_shared_storage, is_local, tune_storage_path
from malloc_ray.study.tracking import resolve_tracking_uri

ALIVE = {"NodeID": "a", "Alive": True}
TWO_NODES = [ALIVE, {"NodeID": "b", "Alive": True}]


def spec_dict(tmp_path: Path, **overrides) -> dict:
    spec = {"name": "t", "output_dir": str(tmp_path / "runs"),
            "datasets": {"syn": {"prepare": {"source": "synthetic", "profile": "kuaivideo",
                                             "users": 40, "max_len": 16, "seed": 0}}},
            "methods": ["native"], "depths": [1], "seeds": [0],
            "trial": {"d_model": 16, "num_heads": 2, "max_len": 16, "epochs": 1}}
    spec.update(overrides)
    return spec


def check(storage, nodes, shared=False, tracking="sqlite:////tmp/x/mlflow.db"):
    check_shared_storage(storage, nodes, study_dir="/tmp/x", tracking_uri=tracking,
                         shared=shared)


def test_one_node_or_a_declared_shared_mount_passes():
    check("/tmp/x/ray_results", [ALIVE])
    check("/tmp/x/ray_results", [ALIVE, {"NodeID": "dead", "Alive": False}])
    check("/mnt/nfs/ray_results", TWO_NODES, shared=True)


@pytest.mark.parametrize("storage", ["/tmp/x/ray_results", "file:///tmp/x", "s3://bucket/r"])
def test_multi_node_with_local_output_is_refused_with_what_to_set(storage):
    with pytest.raises(InputError) as info:
        check(storage, TWO_NODES)
    msg = str(info.value)
    assert "2 alive nodes" in msg and "shared_storage: true" in msg
    assert "--shared-storage" in msg and "--storage-path" in msg and "s3://" in msg
    assert ("storage_path " + storage in msg) == is_local(storage)


def test_local_and_remote_locations():
    for local in ("/abs", "rel/dir", "file:///x", "sqlite:////x/mlflow.db"):
        assert is_local(local), local
    for remote in ("s3://b/k", "gs://b/k", "http://mlflow:5000", "databricks"):
        assert not is_local(remote), remote


def test_tune_storage_path_default_uri_and_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = parse_spec(spec_dict(tmp_path))
    assert tune_storage_path(spec) == str(spec.study_dir / "ray_results")
    spec.storage_path = "gs://bucket/results"
    assert tune_storage_path(spec) == "gs://bucket/results"
    spec.storage_path = "rel/results"
    assert tune_storage_path(spec) == str(tmp_path / "rel" / "results")


def test_spec_keys_are_validated(tmp_path):
    spec = parse_spec(spec_dict(tmp_path, storage_path="s3://b/r", shared_storage=True))
    assert spec.storage_path == "s3://b/r" and spec.shared_storage is True
    with pytest.raises(InputError, match="shared_storage"):
        parse_spec(spec_dict(tmp_path, shared_storage="yes"))


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://env:5000"
    assert resolve_tracking_uri("http://spec:5000", tmp_path) == "http://spec:5000"


def test_cli_flags_override_the_spec(tmp_path, monkeypatch):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict(tmp_path, mlflow={"tracking_uri": "http://s:1"})))
    seen = {}

    def fake_run_study(spec, **kwargs):
        seen["spec"] = spec
        raise InputError("stop here")

    monkeypatch.setattr("malloc_ray.study.run.run_study", fake_run_study)
    assert cli.main(["study", "run", str(path), "--storage-path", "gs://b/r",
                     "--shared-storage", "--mlflow-tracking-uri", "http://flag:5000"]) == 2
    spec = seen["spec"]
    assert spec.storage_path == "gs://b/r" and spec.shared_storage
    assert spec.mlflow_tracking_uri == "http://flag:5000"


def test_study_on_two_nodes_with_local_storage_stops_before_any_trial(tmp_path, monkeypatch,
                                                                     capsys):
    """Acceptance 2: a mocked two-node cluster, a local storage_path: exit 2, the message,
    and neither data nor trials nor a Tuner."""
    import ray
    from ray import tune

    def no_tuner(*args, **kwargs):
        pytest.fail("a Tuner was built on a cluster without shared storage")

    monkeypatch.setattr("malloc_ray.study.run.init_ray", lambda: None)
    monkeypatch.setattr(ray, "nodes", lambda: TWO_NODES)
    monkeypatch.setattr(tune, "Tuner", no_tuner)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict(tmp_path)))

    code = cli.main(["study", "run", str(path), "--storage-path", str(tmp_path / "tune")])
    err = capsys.readouterr().err
    assert code == 2
    assert "2 alive nodes" in err and "shared_storage: true" in err
    assert f"storage_path {tmp_path / 'tune'}" in err
    study_dir = tmp_path / "runs" / "t"
    for made in ("data", "trials", "ray_results", "mlflow.db", "trials.parquet"):
        assert not (study_dir / made).exists(), made
    assert not (tmp_path / "tune").exists()


def test_a_new_sqlite_store_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    """A driver killed while MLflow builds a new store's schema must not leave a file that
    later runs cannot open: the schema is built aside and renamed into place."""
    import mlflow.tracking
    from mlflow.tracking import MlflowClient

    from malloc_ray.study.tracking import create_store

    uri = f"sqlite:///{tmp_path / 'study' / 'mlflow.db'}"
    real = mlflow.tracking.MlflowClient

    def dies_midway(tracking_uri):
        real(tracking_uri)  # the schema is (partly) there ...
        raise KeyboardInterrupt("killed")  # ... and the process dies

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        create_store(uri)
    assert not (tmp_path / "study" / "mlflow.db").exists()
    assert not list((tmp_path / "study").iterdir())  # nothing half-written left behind
    monkeypatch.setattr(mlflow.tracking, "MlflowClient", real)
    create_store(uri)
    assert MlflowClient(uri).search_experiments()  # opens: the Default experiment is there
    before = (tmp_path / "study" / "mlflow.db").stat().st_mtime_ns
    create_store(uri)  # an existing store is left alone
    assert (tmp_path / "study" / "mlflow.db").stat().st_mtime_ns == before
