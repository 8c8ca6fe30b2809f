"""The study service end to end on local Ray: failures as data, MLflow layout, resume after a
SIGKILL, and `ray job submit` against a head this test starts (and alone stops)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# These studies check the service (failures as data, MLflow, resume), not learning: the
# no-learning judgement, which a 2-epoch model on 60 users may or may not pass, is off.
TINY_TRIAL = {"d_model": 16, "num_heads": 2, "max_len": 16, "batch_size": 32, "epochs": 2,
              "patience": 2, "loader": "ray", "no_learning_margin": None}
pytestmark = pytest.mark.slow


def write_spec(tmp_path: Path, **overrides) -> Path:
    spec = {"name": "t", "output_dir": str(tmp_path / "runs"),
            "datasets": {"syn": {"prepare": {"source": "synthetic", "profile": "kuaivideo",
                                             "users": 60, "max_len": 16, "seed": 0}}},
            "methods": ["native", "wo_mem"], "depths": [1], "seeds": [0],
            "trial": dict(TINY_TRIAL), "resources": {"cpus_per_trial": 1}}
    spec.update(overrides)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def cli(*args, env=None, **kwargs):
    # The studies here use their own sqlite store: a URI exported by an earlier test (the mlflow
    # client exports the one it is given) must not redirect them.
    env = {k: v for k, v in (env or os.environ).items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "malloc_ray", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, **kwargs)


def test_faulty_trials_are_rows_and_mlflow_has_one_child_per_cell(tmp_path):
    spec = write_spec(tmp_path, methods=["native", "wo_mem", "mqa", "h2o"], overrides=[
        {"match": {"method": "wo_mem"}, "set": {"fault": "nan:1"}},
        {"match": {"method": "mqa"}, "set": {"fault": "raise:0"}}])
    done = cli("study", "run", str(spec), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    study_dir = tmp_path / "runs" / "t"
    table = pd.read_parquet(study_dir / "trials.parquet").set_index("method")
    assert table.loc["native", "status"] == "ok" and table.loc["h2o", "status"] == "ok"
    assert table.loc["wo_mem", "status"] == "diverged"
    assert table.loc["wo_mem", "failed_epoch"] == 1
    assert table.loc["mqa", "status"] == "error" and "injected" in table.loc["mqa", "reason"]
    assert table.loc["h2o", "epochs_run"] == 0  # post-hoc: Native's weights, no training

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{study_dir / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["t"])
    parents = runs[runs["tags.malloc.role"] == "study"]
    children = runs[runs["tags.malloc.role"] == "trial"]
    assert len(parents) == 1 and len(children) == len(table) == 4
    assert (children["tags.mlflow.parentRunId"] == parents["run_id"].iloc[0]).all()
    for tag in ("method", "category", "workflow", "depth", "seed", "dataset_id", "config_hash",
                "status"):
        assert children[f"tags.{tag}"].notna().all(), tag
    by_method = children.set_index("tags.method")
    assert by_method.loc["wo_mem", "tags.status"] == "diverged"
    assert by_method.loc["h2o", "tags.workflow"] == "post-hoc"
    assert set(by_method["tags.config_hash"]) == set(table["trial_id"])
    # the dataset's label-stream audit travels with its id: per dataset on the parent, on every
    # child ("n/a" for a dataset prepared before the audit existed)
    parent = parents.iloc[0]
    assert parent["params.dataset_id.syn"] == table["dataset_id"].iloc[0]
    audit = parent["params.label_stream_auc.syn"]
    assert audit == "n/a" or 0.0 <= float(audit) <= 1.0, audit
    assert (children["params.label_stream_auc"] == audit).all()

    # the trials table is rebuilt from MLflow alone when the file and the result files are lost
    import shutil

    from malloc_ray.study.results import load_table

    (study_dir / "trials.parquet").unlink()
    shutil.rmtree(study_dir / "trials")
    rebuilt = load_table(study_dir, f"sqlite:///{study_dir / 'mlflow.db'}", "t").set_index("method")
    assert set(rebuilt.index) == set(table.index)
    for method in table.index:
        for col in ("trial_id", "status", "depth", "seed", "mlflow_run_id", "kv_bytes_per_user",
                    "kv_payload_bytes_per_user", "auc"):
            a, b = rebuilt.loc[method, col], table.loc[method, col]
            assert (pd.isna(a) and pd.isna(b)) or a == pytest.approx(b) or a == b, (method, col)
    assert rebuilt.loc["wo_mem", "failed_epoch"] == 1
    # ... per-epoch curves included (from the metric histories), so reports need nothing else
    for method in ("native", "wo_mem"):
        got, want = (json.loads(t.loc[method, "history"]) for t in (rebuilt, table))
        assert len(got) == len(want)
        for g, w in zip(got, want):  # NaN values (single-class GAUC) are not logged to MLflow
            assert g == pytest.approx({k: v for k, v in w.items() if v == v})
    assert len(json.loads(rebuilt.loc["native", "history"])) == 2

    # the report: built from the table, failures listed, logged on the parent run
    done = cli("report", str(study_dir), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    failures = pd.read_csv(study_dir / "report" / "tables" / "failures.csv").set_index("method")
    assert failures.loc["wo_mem", "diverged"] == 1 and failures.loc["mqa", "error"] == 1
    assert failures.loc["native", "ok"] == 1 and failures["failed"].sum() == 2
    client = mlflow.tracking.MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    parent_id = parents["run_id"].iloc[0]
    assert "report/report.html" in {a.path for a in client.list_artifacts(parent_id, "report")}
    native_run = by_method.loc["native", "run_id"]
    assert "training_curves.png" in {a.path for a in client.list_artifacts(native_run)}
    info = json.loads((study_dir / "study.json").read_text())
    assert info["mlflow"]["parent_run_id"] == parent_id and info["code"]["git_commit"]
    assert info["datasets"]["syn"]["dataset_id"] == table["dataset_id"].iloc[0]


def test_sigkill_then_resume_runs_every_cell_exactly_once(tmp_path):
    spec = write_spec(tmp_path, depths=[1, 2], seeds=[0, 1],
                      trial={**TINY_TRIAL, "epochs": 3})
    study_dir = tmp_path / "runs" / "t"
    proc = subprocess.Popen([sys.executable, "-m", "malloc_ray", "study", "run", str(spec)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not list((study_dir / "trials").glob("*.json")):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    before = {p.name: json.loads(p.read_text()) for p in (study_dir / "trials").glob("*.json")}
    assert 1 <= len(before) < 8, "the kill must land mid-study"

    resumed = cli("study", "resume", str(spec), timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    table = pd.read_parquet(study_dir / "trials.parquet")
    assert len(table) == 8 and table["trial_id"].is_unique
    assert not table.duplicated(["method", "depth", "seed"]).any()
    for name, result in before.items():  # finished before the kill: not trained again
        row = table[table["trial_id"] == result["trial_id"]].iloc[0]
        assert row["mlflow_run_id"] == result["mlflow_run_id"]
        assert row["finished_at"] == pytest.approx(result["finished_at"])
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{study_dir / 'mlflow.db'}")
    children = mlflow.search_runs(experiment_names=["t"],
                                  filter_string="tags.`malloc.role` = 'trial'")
    assert len(children) == 8 and children["tags.config_hash"].is_unique


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_processes_of(temp_dir: str) -> list[int]:
    """Processes whose command line names our temp dir, and all their descendants."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True,
                         text=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines() if line.strip()]
    children: dict[int, list[int]] = {}
    for pid, ppid, *_ in rows:
        children.setdefault(int(ppid), []).append(int(pid))
    found = [int(pid) for pid, _, *args in rows if args and temp_dir in args[0]]
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.append(child)
                stack.append(child)
    return found


def test_ray_job_submit_runs_the_smoke_quickstart(tmp_path):
    ray_bin = Path(sys.executable).parent / "ray"
    temp_dir = f"/tmp/rj{os.getpid()}"  # short: Ray's socket paths must stay < 108 chars
    # The job's `python` is looked up on the PATH that `ray start` saw: put this venv first.
    # A busy 2-core machine can take longer than Ray's default to register the raylet.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_raylet_start_wait_time_s": "180",
           "PATH": f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, agent, metrics = (_free_port() for _ in range(4))
    # Free ports for everything that has a fixed default, so a Ray already running on this
    # machine (or a stale agent) cannot take them.
    start = subprocess.run([str(ray_bin), "start", "--head", f"--port={gcs}", "--num-cpus=2",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                            f"--dashboard-agent-listen-port={agent}",
                            f"--metrics-export-port={metrics}", f"--temp-dir={temp_dir}",
                            "--disable-usage-stats"], env=env, capture_output=True, text=True)
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        out = tmp_path / "runs"
        command = [str(ray_bin), "job", "submit", f"--address=http://127.0.0.1:{dashboard}",
                   "--working-dir", str(REPO), "--", "python", "-m", "malloc_ray", "study",
                   "run", "experiments/quickstart.yaml", "--smoke-test", "--output-dir", str(out)]
        for _ in range(20):  # the head's job agent comes up a little after `ray start` returns
            submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
            if "No available agent" not in submit.stderr + submit.stdout:
                break
            time.sleep(3)
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-4000:]
        table = pd.read_parquet(out / "quickstart-smoke" / "trials.parquet")
        # a smoke run checks the pipeline: a tiny model may honestly end `no_learning`
        assert len(table) > 0 and table["status"].isin(["ok", "no_learning"]).all()
        # the study ends with its report, logged on the MLflow parent run
        study_dir = out / "quickstart-smoke"
        assert (study_dir / "report" / "report.html").exists()
        from mlflow.tracking import MlflowClient

        info = json.loads((study_dir / "study.json").read_text())
        from malloc_ray.study.tracking import study_tracking_uri

        client = MlflowClient(study_tracking_uri(study_dir, info))  # the study's own store
        listed = {a.path for a in client.list_artifacts(info["mlflow"]["parent_run_id"],
                                                         "report/figures")}
        assert "report/figures/fig4_gauc_macs.png" in listed
    finally:
        for pid in _ray_processes_of(temp_dir):  # only what this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_optuna_multi_objective_search_smoke(tmp_path):
    spec = write_spec(tmp_path, methods=["native", "mqa"], depths=[1, 2],
                      search={"mode": "optuna", "num_samples": 2,
                              "objectives": ["auc", "kv_bytes_per_user"],
                              "space": {"lr": {"loguniform": [1.0e-4, 1.0e-2]}}})
    done = cli("study", "run", str(spec), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    study_dir = tmp_path / "runs" / "t"
    table = pd.read_parquet(study_dir / "trials.parquet")
    assert len(table) == 2 and set(table["method"]) <= {"native", "mqa"}
    import optuna

    study = optuna.load_study(study_name="t-syn", storage=f"sqlite:///{study_dir / 'optuna.db'}")
    assert len(study.directions) == 2  # NSGA-II over AUC and bytes, persisted beside MLflow
    assert len(study.trials) == 2
    again = cli("study", "run", str(spec), timeout=900)  # budget used up: nothing new runs
    assert again.returncode == 0 and len(pd.read_parquet(study_dir / "trials.parquet")) == 2


def test_a_study_of_random_models_reports_no_learning_and_no_findings(tmp_path):
    """Every trial random (a learning rate that moves nothing; a margin no random model
    reaches): every cell is no_learning, the findings open with the banner, and Table 2 has
    no bold and no Δ column."""
    spec = write_spec(tmp_path, methods=["native", "mqa", "h2o"], seeds=[0, 1],
                      trial={**TINY_TRIAL, "lr": 1e-12, "epochs": 1, "no_learning_margin": 0.2})
    done = cli("study", "run", str(spec), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    study_dir = tmp_path / "runs" / "t"
    table = pd.read_parquet(study_dir / "trials.parquet")
    assert len(table) == 6 and (table["status"] == "no_learning").all(), table["status"]
    summary = pd.read_csv(study_dir / "report" / "summary.csv", keep_default_na=False)
    assert (summary["verdict_vs_native"] == "n/a").all()  # (pandas would read "n/a" as NaN)
    assert (summary["delta_gauc_vs_native"] == "").all()
    page = (study_dir / "report" / "report.html").read_text()
    assert 'data-banner="syn"' in page and "measured no method" in page
    t2 = page[page.index('data-table="table2_depth1"'):]
    t2 = t2[:t2.index("</table>")]
    assert "<b>" not in t2 and "ΔGAUC" not in t2
    assert "measured no method" in (study_dir / "report" / "findings.md").read_text()
