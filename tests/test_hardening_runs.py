"""Hardening of the study service.

- A local study's Ray listens on 127.0.0.1 only (every socket of every process it starts).
- Exactly one MLflow child run per cell, finished, whatever is killed when: a trial crashing
  between its result file and its run's finish, `--retry-failed`, and the driver SIGKILLed at
  seeded random points in >= 20 runs of a tiny study; the final table equals a fault-free run.
- A study directory is relocatable: `report` and `study resume` work on a copy whose original
  is gone, create nothing outside it, a missing store is a one-line error (exit 2), and a
  rebuilt table with no rows is never saved.

The in-process tests run the real driver (`run_study`) with the Tune phase replaced by a loop
over the cells (no Ray); the `slow` ones start Ray: one local study (the fault-free reference,
watched for listening sockets) and one loopback-only head that the killed drivers join.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

import ray  # noqa: F401 - puts Ray's bundled psutil on sys.path
import psutil  # noqa: E402

from malloc_ray import cli
from malloc_ray.errors import InputError
from malloc_ray.study import tracking
from malloc_ray.study.results import load_table
from malloc_ray.study.tracking import ChildRun

REPO = Path(__file__).resolve().parents[1]
RAY_BIN = Path(sys.executable).parent / "ray"
# The smallest study with two cells: one ok, one that diverges (so --retry-failed re-runs it).
TRIAL = {"d_model": 8, "num_heads": 2, "max_len": 8, "batch_size": 64, "epochs": 1,
         "patience": 1, "lr": 0.05, "loader": "local",
         "warmup_steps": 0}  # the default warm-up is longer than these whole trials
# What a fault-free run must reproduce exactly (CPU): everything but times and run ids.
SAME = ["trial_id", "dataset", "dataset_id", "method", "depth", "seed", "status", "failed_epoch",
        "auc", "gauc", "logloss", "valid_auc", "best_epoch", "epochs_run", "kv_bytes_per_user",
        "kv_payload_bytes_per_user", "macs_per_request", "macs_prefill"]


def spec_dict(output_dir: Path, name: str = "h") -> dict:
    return {"name": name, "output_dir": str(output_dir),
            "datasets": {"syn": {"prepare": {"source": "synthetic", "profile": "kuaivideo",
                                             "users": 30, "max_len": 8, "seed": 0}}},
            "methods": ["native", "wo_mem"], "depths": [1], "seeds": [0], "trial": dict(TRIAL),
            "overrides": [{"match": {"method": "wo_mem"}, "set": {"fault": "nan:0"}}],
            "resources": {"cpus_per_trial": 1}}


def write_spec(path: Path, output_dir: Path, name: str = "h") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec_dict(output_dir, name)))
    return path


def children_by_cell(study_dir: Path, experiment: str = "h") -> dict[str, list]:
    """config_hash -> the active MLflow child runs of that cell."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    out: dict[str, list] = {}
    for run in tracking.cell_runs(client, exp.experiment_id):
        out.setdefault(run.data.tags["config_hash"], []).append(run)
    return out


def assert_one_finished_child_per_cell(study_dir: Path, experiment: str = "h") -> pd.DataFrame:
    """Every cell: one row, one active child run, FINISHED, the one its row names, with the
    row's metrics; no child run of a cell without a row; one parent run."""
    from mlflow.tracking import MlflowClient

    table = pd.read_parquet(study_dir / "trials.parquet")
    assert table["trial_id"].is_unique
    results = {p.stem for p in (study_dir / "trials").glob("*.json")}
    assert set(table["trial_id"]) == results
    children = children_by_cell(study_dir, experiment)
    assert set(children) == set(table["trial_id"]), (set(children), set(table["trial_id"]))
    for _, row in table.iterrows():
        runs = children[row["trial_id"]]
        assert len(runs) == 1, [(r.info.run_id, r.info.status) for r in runs]
        run = runs[0]
        assert run.info.status == "FINISHED" and run.info.run_id == row["mlflow_run_id"]
        assert run.data.tags["status"] == row["status"]
        assert run.data.metrics["test_auc"] == pytest.approx(row["auc"])
    client = MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`malloc.role` = 'study'")
    assert len(parents) == 1
    return table


def assert_same_table(got: pd.DataFrame, want: pd.DataFrame) -> None:
    got = got.set_index("trial_id").sort_index()
    want = want.set_index("trial_id").sort_index()
    assert list(got.index) == list(want.index)
    for col in SAME[1:]:
        for tid in want.index:
            a, b = got.loc[tid, col], want.loc[tid, col]
            assert (pd.isna(a) and pd.isna(b)) or a == b, (tid, col, a, b)
    for tid in want.index:  # per-epoch curves too, times (and NaN: MLflow drops it) aside
        strip = lambda h: [{k: v for k, v in e.items() if k != "seconds" and v == v}  # noqa
                           for e in json.loads(h)]
        assert strip(got.loc[tid, "history"]) == strip(want.loc[tid, "history"])


def tree(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


# -- the driver without Ray -------------------------------------------------------------------
class Killed(BaseException):
    """Stands in for the process dying: nothing catches it."""


class InProcess:
    """`run_study` as the CLI runs it, but the Tune phase is a plain loop over its cells; and
    `crash_after_result(method)` makes the next finish of that cell's child run die first
    (result file written, run RUNNING), as a process killed right there would."""

    def __init__(self, monkeypatch):
        from malloc_ray.study import run as run_mod
        from malloc_ray.study.trainable import run_cell

        def run_phase(name, spec, records, study, samples):
            for rec in records:
                run_cell(rec, study, str(spec.study_dir))

        monkeypatch.setattr(run_mod, "init_ray", lambda: None)
        monkeypatch.setattr(run_mod, "check_cluster_storage", lambda spec, uri: None)
        monkeypatch.setattr(run_mod, "cuda_device_bytes", lambda: None)
        monkeypatch.setattr(run_mod, "run_phase", run_phase)
        self.crash_method = None
        finish = ChildRun.finish

        def maybe_dying_finish(child, result):
            if result["method"] == self.crash_method:
                self.crash_method = None
                raise Killed()
            return finish(child, result)

        monkeypatch.setattr(ChildRun, "finish", maybe_dying_finish)

    def __call__(self, spec_path: Path, *flags: str) -> int:
        return cli.main(["study", "run", str(spec_path), "--no-report", *flags])

    def crash_after_result(self, method: str) -> None:
        self.crash_method = method


@pytest.fixture
def in_process(monkeypatch):
    return InProcess(monkeypatch)


def test_crash_between_result_file_and_run_finish_then_resume(tmp_path, in_process):
    reference = write_spec(tmp_path / "ref.yaml", tmp_path / "ref")
    assert in_process(reference) == 0
    want = assert_one_finished_child_per_cell(tmp_path / "ref" / "h")
    wo_mem = want.set_index("method").loc["wo_mem", "trial_id"]

    spec = write_spec(tmp_path / "spec.yaml", tmp_path / "runs")
    study_dir = tmp_path / "runs" / "h"
    in_process.crash_after_result("wo_mem")
    with pytest.raises(Killed):
        in_process(spec)
    result = json.loads((study_dir / "trials" / f"{wo_mem}.json").read_text())
    [stuck] = children_by_cell(study_dir)[wo_mem]
    assert stuck.info.status == "RUNNING" and stuck.info.run_id == result["mlflow_run_id"]
    assert "auc" not in stuck.data.metrics  # the state a crash there leaves

    assert in_process(spec) == 0  # resume
    got = assert_one_finished_child_per_cell(study_dir)
    assert_same_table(got, want)
    [fixed] = children_by_cell(study_dir)[wo_mem]
    assert fixed.info.run_id == stuck.info.run_id  # repaired from the file, not re-trained
    assert fixed.data.tags["status"] == "diverged"
    from mlflow.tracking import MlflowClient

    names = {a.path for a in MlflowClient(f"sqlite:///{study_dir / 'mlflow.db'}")
             .list_artifacts(fixed.info.run_id)}
    assert {"config.json", "result.json"} <= names

    # --retry-failed re-runs the diverged cell: still one FINISHED child run per cell (its
    # old run is replaced), also when the re-run dies between its result file and finish.
    assert in_process(spec, "--retry-failed") == 0
    got = assert_one_finished_child_per_cell(study_dir)
    assert_same_table(got, want)
    assert children_by_cell(study_dir)[wo_mem][0].info.run_id != fixed.info.run_id
    in_process.crash_after_result("wo_mem")
    with pytest.raises(Killed):
        in_process(spec, "--retry-failed")
    assert sorted(r.info.status for r in children_by_cell(study_dir)[wo_mem]) == [
        "FINISHED", "RUNNING"]  # the old run and the new one its result file names
    assert in_process(spec) == 0
    assert_same_table(assert_one_finished_child_per_cell(study_dir), want)


def test_reconcile_repairs_duplicates_deleted_and_lost_runs(tmp_path, in_process):
    """Stores left by earlier versions: two FINISHED runs of one cell (--retry-failed used to
    keep both), the result's run deleted, or gone from the store altogether."""
    from mlflow.tracking import MlflowClient

    from malloc_ray.study.trainable import reconcile_study

    spec = write_spec(tmp_path / "spec.yaml", tmp_path / "runs")
    study_dir = tmp_path / "runs" / "h"
    assert in_process(spec) == 0
    want = assert_one_finished_child_per_cell(study_dir)
    info = json.loads((study_dir / "study.json").read_text())["mlflow"]
    study = tracking.StudyRun(f"sqlite:///{study_dir / 'mlflow.db'}", info["experiment_id"],
                              info["parent_run_id"])
    client = MlflowClient(study.tracking_uri)
    native, wo_mem = want.set_index("method").loc[["native", "wo_mem"], "trial_id"]
    # a duplicate FINISHED child of native
    dup = client.create_run(study.experiment_id, tags={"malloc.role": "trial",
                                                       "config_hash": native})
    client.set_terminated(dup.info.run_id, "FINISHED")
    # wo_mem's run deleted
    client.delete_run(want.set_index("method").loc["wo_mem", "mlflow_run_id"])
    counts = reconcile_study(study, study_dir, say=lambda _: None)
    assert counts["deleted"] == 1 and counts["restored"] == 1
    assert_one_finished_child_per_cell(study_dir)
    # wo_mem's run gone from the store: re-created from the result file, which now names it
    path = study_dir / "trials" / f"{wo_mem}.json"
    result = json.loads(path.read_text())
    path.write_text(json.dumps({**result, "mlflow_run_id": "0" * 32}))
    client.delete_run(result["mlflow_run_id"])
    counts = reconcile_study(study, study_dir, say=lambda _: None)
    assert counts["recreated"] == 1
    new_id = json.loads(path.read_text())["mlflow_run_id"]
    [run] = children_by_cell(study_dir)[wo_mem]
    assert run.info.run_id == new_id and run.data.tags["status"] == "diverged"
    assert run.data.metrics["test_logloss"] == pytest.approx(result["logloss"])
    assert reconcile_study(study, study_dir, say=lambda _: None) == {
        "finished": 0, "deleted": 0, "restored": 0, "recreated": 0}


# -- moving a study -------------------------------------------------------------------------
def test_moved_study_report_and_resume_stay_inside_the_copy(tmp_path, in_process, capsys):
    from mlflow.tracking import MlflowClient

    root = tmp_path
    spec = write_spec(root / "spec.yaml", root / "old")
    assert in_process(spec) == 0
    old = root / "old" / "h"
    info = json.loads((old / "study.json").read_text())
    assert info["mlflow"]["store"] == "mlflow.db" and info["mlflow"]["tracking_uri"] is None
    assert info["datasets"]["syn"]["dir"] == "data/syn"
    assert str(old) not in json.dumps(info["mlflow"]) + json.dumps(info["datasets"])

    new = root / "x" / "h"
    shutil.copytree(old, new)
    shutil.rmtree(root / "old")
    before = tree(root)
    capsys.readouterr()
    # pointed at the copy's store explicitly (the plain `report COPY` finds it the same way)
    assert cli.main(["report", str(new), "--mlflow-tracking-uri",
                     f"sqlite:///{new / 'mlflow.db'}"]) == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    # a cell re-runs on the copy (its result file removed): its child run and artifacts too
    victim = next((new / "trials").glob("*.json"))
    victim.unlink()
    assert in_process(spec, "--output-dir", str(root / "x")) == 0  # `study resume` == `run`
    created = tree(root) - before
    assert created and all(p.startswith(str(new) + os.sep) for p in created), \
        sorted(p for p in created if not p.startswith(str(new)))
    assert not (root / "old").exists()
    client = MlflowClient(f"sqlite:///{new / 'mlflow.db'}")
    parent = out["mlflow_run_id"]
    assert "report/report.html" in {a.path for a in client.list_artifacts(parent, "report")}
    assert client.get_run(parent).info.artifact_uri.startswith((new / "mlartifacts").as_uri())
    assert_one_finished_child_per_cell(new)
    for runs in children_by_cell(new).values():
        assert {"config.json", "result.json"} <= {a.path for a in
                                                  client.list_artifacts(runs[0].info.run_id)}

    # the store gone: one line, exit 2, nothing created; --no-mlflow: a report all the same
    (new / "mlflow.db").unlink()
    before = tree(root)
    assert cli.main(["report", str(new)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mlflow.db" in err and "--no-mlflow" in err, err
    assert cli.main(["study", "resume", str(spec), "--output-dir", str(root / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mlflow.db" in err and "is missing" in err, err
    assert tree(root) == before
    assert cli.main(["report", str(new), "--no-mlflow"]) == 0
    assert json.loads(capsys.readouterr().out)["mlflow_run_id"] is None

    # no table and no result files: an error, and no 0-row table saved
    (new / "trials.parquet").unlink()
    shutil.rmtree(new / "trials")
    assert cli.main(["report", str(new), "--no-mlflow"]) == 2
    assert "trials.parquet" in capsys.readouterr().err
    assert not (new / "trials.parquet").exists()


def test_trials_table_rebuild_prefers_result_files_and_never_saves_zero_rows(tmp_path,
                                                                               in_process):
    spec = write_spec(tmp_path / "spec.yaml", tmp_path / "runs")
    study_dir = tmp_path / "runs" / "h"
    assert in_process(spec) == 0
    uri = f"sqlite:///{study_dir / 'mlflow.db'}"
    table = pd.read_parquet(study_dir / "trials.parquet")
    # a 0-row file (what older versions saved) is not trusted: rebuilt from the result files
    table.iloc[:0].to_parquet(study_dir / "trials.parquet")
    assert_same_table(load_table(study_dir, uri, "h"), table)
    assert len(pd.read_parquet(study_dir / "trials.parquet")) == 2
    # no result files, an experiment without child runs: an error, nothing saved
    (study_dir / "trials.parquet").unlink()
    shutil.rmtree(study_dir / "trials")
    tracking.start_study_run(uri, "empty", study_dir)
    with pytest.raises(InputError, match="nothing was saved"):
        load_table(study_dir, uri, "empty")
    assert not (study_dir / "trials.parquet").exists()
    # ... while MLflow's child runs still rebuild it when the result files are lost
    assert_same_table(load_table(study_dir, uri, "h"), table)


def test_legacy_absolute_store_is_found_in_the_moved_study(tmp_path):
    old, new = tmp_path / "a" / "s", tmp_path / "b" / "s"
    legacy = {"mlflow": {"tracking_uri": f"sqlite:///{old / 'mlflow.db'}", "experiment": "s"},
              "spec": {"output_dir": str(old.parent), "name": "s"}}
    assert tracking.study_tracking_uri(new, legacy) == f"sqlite:///{new / 'mlflow.db'}"
    assert tracking.study_tracking_uri(new, {"mlflow": {"store": "mlflow.db"}}) == \
        f"sqlite:///{new / 'mlflow.db'}"
    server = {"mlflow": {"tracking_uri": "http://mlflow:5000"}}
    assert tracking.study_tracking_uri(new, server) == "http://mlflow:5000"
    assert tracking.study_tracking_uri(new, server, "sqlite:////x.db") == "sqlite:////x.db"
    assert tracking.recorded_mlflow(f"sqlite:///{new / 'mlflow.db'}", new)["store"] == "mlflow.db"
    assert tracking.recorded_mlflow("http://m:5000", new) == {"store": None,
                                                              "tracking_uri": "http://m:5000"}


# -- Ray: loopback only ---------------------------------------------------------------------
def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def kind(proc: psutil.Process, driver: int) -> str:
    """A readable name of a Ray process (the table in the docs uses the same names)."""
    if proc.pid == driver:
        return "driver (core worker)"
    args = proc.cmdline()
    line = " ".join(args)
    for needle, name in (("gcs_server", "gcs_server"), ("raylet/raylet", "raylet"),
                         ("ray::DashboardAgent", "dashboard agent"),
                         ("ray::RuntimeEnvAgent", "runtime env agent"),
                         ("dashboard/dashboard.py", "dashboard head (minimal)"),
                         ("log_monitor.py", "log monitor"), ("monitor.py", "autoscaler monitor")):
        if needle in line:
            return name
    if args and args[0].startswith("ray::"):
        return "worker"
    return Path(args[0]).name if args else "?"


def listening(driver: int) -> set[tuple[str, str, int]]:
    """(process kind, ip, port) of every listening TCP / bound UDP socket of the driver and
    everything it started."""
    try:
        root = psutil.Process(driver)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return set()
    out = set()
    for proc in procs:
        try:
            conns, name = proc.net_connections(kind="inet"), kind(proc, driver)
        except psutil.Error:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr):
                out.add((name, c.laddr.ip, c.laddr.port))
    return out


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return {**env, "RAY_USAGE_STATS_ENABLED": "0", **extra}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A fault-free local study (its own Ray, as `malloc-ray study run` starts it), its
    listening sockets sampled while it runs: the reference table of the kill test."""
    root = tmp_path_factory.mktemp("reference")
    spec = write_spec(root / "spec.yaml", root / "runs")
    seen: set = set()
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "malloc_ray", "study", "run", str(spec),
                             "--no-report"], cwd=REPO, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler_done = threading.Event()

    def sample():
        while not sampler_done.is_set():
            seen.update(listening(proc.pid))
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output, _ = proc.communicate(timeout=900)
    sampler_done.set()
    thread.join()
    assert proc.returncode == 0, output[-4000:]
    study_dir = root / "runs" / "h"
    table = assert_one_finished_child_per_cell(study_dir)
    assert sorted(table["status"]) == ["diverged", "ok"]
    return {"study_dir": study_dir, "table": table, "sockets": seen,
            "seconds": time.time() - start}


@pytest.mark.slow
def test_local_study_listens_on_loopback_only(reference):
    seen = reference["sockets"]
    print("\nlistening sockets of the local study:\n" + "\n".join(
        f"  {name:26s} {ip}:{port}" for name, ip, port in sorted(seen)))
    kinds = {name for name, _, _ in seen}
    # not vacuous: the processes that used to listen on every interface were all seen
    assert {"driver (core worker)", "gcs_server", "raylet", "worker", "dashboard agent",
            "runtime env agent"} <= kinds, kinds
    outside = sorted(s for s in seen if not is_loopback(s[1]))
    assert not outside, f"listening beyond loopback: {outside}"


# -- Ray: the driver SIGKILLed at random points ---------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _head_processes(temp_dir: str) -> list[psutil.Process]:
    me = os.getpid()
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid != me and any(temp_dir in a for a in proc.info["cmdline"] or []):
                found[proc.pid] = proc
                found.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.Error:
            pass
    return list(found.values())


@pytest.fixture(scope="module")
def head():
    """One loopback-only Ray head for every killed driver (they join it via RAY_ADDRESS), with
    token authentication on; stopped (only what it started) at the end."""
    temp_dir = f"/tmp/rk{os.getpid()}"  # short: Ray's socket paths must stay < 108 chars
    token = Path(f"{temp_dir}.token")
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps 127.0.0.1 as the node address (ray_local.py);
    # the drivers need it too, else they resolve RAY_ADDRESS 127.0.0.1 to the routable address.
    env = clean_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
                    RAY_AUTH_TOKEN_PATH=str(token), RAY_raylet_start_wait_time_s="180")
    port = _free_port()
    start = subprocess.run([str(RAY_BIN), "start", "--head", "--node-ip-address=127.0.0.1",
                            f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                            f"--dashboard-agent-listen-port={_free_port()}",
                            f"--metrics-export-port={_free_port()}", f"--temp-dir={temp_dir}",
                            "--disable-usage-stats"], env=env, capture_output=True, text=True)
    try:
        assert start.returncode == 0, start.stderr[-3000:]
        yield {"env": {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, "temp_dir": temp_dir}
    finally:
        for proc in _head_processes(temp_dir):
            try:
                proc.kill()
            except psutil.Error:
                pass
        token.unlink(missing_ok=True)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _raylet(temp_dir: str) -> psutil.Process | None:
    for proc in _head_processes(temp_dir):
        try:
            if "raylet/raylet" in " ".join(proc.cmdline()):
                return proc
        except psutil.Error:
            pass
    return None


def _busy_workers(raylet: psutil.Process | None) -> list[psutil.Process]:
    """Worker processes that run something (a trial) for some driver."""
    out = []
    for proc in (raylet.children() if raylet else []):
        try:
            title = proc.cmdline()[0]
        except (psutil.Error, IndexError):
            continue
        if title.startswith("ray::") and not title.startswith(
                ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")):
            out.append(proc)
    return out


def _stuck_after_result(study_dir: Path) -> set[str]:
    """Child runs still RUNNING that a result file names (a crash between the result file and
    the run's finish)."""
    if not (study_dir / "mlflow.db").exists():
        return set()
    out = set()
    for trial_id, runs in children_by_cell(study_dir).items():
        path = study_dir / "trials" / f"{trial_id}.json"
        named = json.loads(path.read_text()).get("mlflow_run_id") if path.exists() else None
        out |= {r.info.run_id for r in runs if r.info.status == "RUNNING"
                and r.info.run_id == named}
    return out


@pytest.mark.slow
def test_driver_sigkill_at_seeded_random_points(tmp_path, head, reference):
    """N = 20 drivers of the tiny study, each SIGKILLed at a seeded random point of its run
    (a uniform fraction of how long the last uninterrupted run of its kind took). Most runs
    pass --retry-failed, so each has a trial to run (the diverged cell); every 5th is killed
    the moment a trial writes its result file, together with that trial (a machine dying
    between the result file and the run's finish). Then `study resume --retry-failed`: one
    row and one FINISHED child run per cell, and the table equals the fault-free reference."""
    started = time.time()
    rng = random.Random(20261201)
    spec = write_spec(tmp_path / "spec.yaml", tmp_path / "runs")
    study_dir = tmp_path / "runs" / "h"
    raylet = _raylet(head["temp_dir"])
    # how long an uninterrupted run of each kind takes; first guess from the reference run
    # (which also started Ray), then what runs that ended by themselves took
    took = {"retry": 0.8 * reference["seconds"], "plain": 0.5 * reference["seconds"]}
    kills, runs, window_hits, log, stuck = 0, 0, 0, [], set()
    while kills < 20 and runs < 45:
        runs += 1
        kind_ = "plain" if runs % 4 == 0 else "retry"
        on_result = kind_ == "retry" and runs % 5 == 0
        delay = rng.uniform(0.0, took[kind_])
        flags = ["--retry-failed"] if kind_ == "retry" else []
        trials = study_dir / "trials"
        seen = {p: p.stat().st_mtime_ns for p in trials.glob("*.json")}
        driver = subprocess.Popen([sys.executable, "-m", "malloc_ray", "study", "run",
                                   str(spec), "--no-report", *flags], cwd=REPO, env=head["env"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        t0 = time.time()
        while driver.poll() is None:
            if on_result:
                if any(seen.get(p) != p.stat().st_mtime_ns for p in trials.glob("*.json")):
                    break
            elif time.time() - t0 >= delay:
                break
            time.sleep(0.01)
        if driver.poll() is not None:
            took[kind_] = time.time() - t0
            stuck = set()  # a whole run reconciles everything
            log.append(f"run {runs:2d} {kind_:5s}: ended by itself after {took[kind_]:.1f}s")
            continue
        busy = _busy_workers(raylet)
        os.killpg(driver.pid, signal.SIGKILL)
        if on_result:  # the trial that just wrote its result file dies with the driver
            for proc in busy:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
        driver.wait()
        kills += 1
        # Ray kills a dead driver's trials; wait for it, so none races the next driver
        killed_at = time.time()
        psutil.wait_procs(_busy_workers(raylet), timeout=30)
        cleanup = time.time() - killed_at
        now = _stuck_after_result(study_dir)
        hit, stuck = now - stuck, now
        window_hits += bool(hit)
        log.append(f"run {runs:2d} {kind_:5s}: killed after {time.time() - t0:.1f}s"
                   + (" (on a result file)" if on_result else f" (drawn {delay:.1f}s)")
                   + (" -> a RUNNING run named by its result file" if hit else "")
                   + f"; its trials gone {cleanup:.1f}s later")
    loop_seconds = time.time() - started
    done = subprocess.run([sys.executable, "-m", "malloc_ray", "study", "resume", str(spec),
                           "--retry-failed", "--no-report"], cwd=REPO, env=head["env"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert_same_table(assert_one_finished_child_per_cell(study_dir), reference["table"])
    print(f"\nkill test: {kills} kills in {runs} runs ({loop_seconds:.0f}s), {window_hits} "
          f"left a RUNNING run named by a result file; with the final resume "
          f"{time.time() - started:.0f}s\n  " + "\n  ".join(log))
    assert kills >= 20


@pytest.mark.slow
def test_moved_study_with_the_real_cli(tmp_path_factory, head, reference):
    """Acceptance: `malloc-ray report` and `malloc-ray study resume` (Tune trials logging
    into MLflow) on a copy of a finished study whose original is gone; nothing is created
    outside the copy. Runs after the kill test: it moves the reference study away."""
    base = tmp_path_factory.getbasetemp()
    old = reference["study_dir"]
    new = tmp_path_factory.mktemp("moved") / "runs" / "h"
    shutil.copytree(old, new)
    shutil.rmtree(old.parent)
    victim = next((new / "trials").glob("*.json"))
    victim.unlink()  # resume re-runs this cell on the copy
    spec = write_spec(new.parent.parent / "spec.yaml", new.parent)
    before = tree(base)
    # resume first: the driver relocates the store, the Tune trial logs into the copy
    resumed = subprocess.run([sys.executable, "-m", "malloc_ray", "study", "resume", str(spec),
                              "--no-report"], cwd=REPO, env=head["env"], capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    report = subprocess.run([sys.executable, "-m", "malloc_ray", "report", str(new)], cwd=REPO,
                            env=clean_env(), capture_output=True, text=True, timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    created = tree(base) - before
    outside = sorted(p for p in created if not p.startswith(str(new) + os.sep))
    assert created and not outside, outside
    assert not old.exists()
    assert_same_table(assert_one_finished_child_per_cell(new), reference["table"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{new / 'mlflow.db'}")
    [rerun] = children_by_cell(new)[victim.stem]
    assert rerun.info.artifact_uri.startswith((new / "mlartifacts").as_uri())
    assert {"config.json", "result.json"} <= {a.path for a in
                                              client.list_artifacts(rerun.info.run_id)}
    parent = json.loads(report.stdout)["mlflow_run_id"]
    assert "report/report.html" in {a.path for a in client.list_artifacts(parent, "report")}
