"""A finished smoke study as a user meets it in MLflow: the runs table in the UI (headless
Chromium, screenshots for docs/mlflow.md), dataset inputs, system metrics and the trade-off
table through `mlflow.search_runs`, and the same record on an MLflow tracking server."""

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cdp import Browser, free_port
from test_report import ensure_chromium

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "docs" / "img"
SYSTEM_METRICS = ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                  "system/process_memory_rss_megabytes")
pytestmark = pytest.mark.slow


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def run_smoke_study(out: Path, *extra: str) -> Path:
    """The README's smoke quickstart (a few cells of seconds each), its report included."""
    done = subprocess.run([sys.executable, "-m", "malloc_ray", "study", "run",
                           "experiments/quickstart.yaml", "--smoke-test", "--output-dir",
                           str(out), *extra], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return out / "quickstart-smoke"


class MlflowProcess:
    """`mlflow ui` / `mlflow server` on 127.0.0.1 and a free port; stopped (only it) on exit."""

    def __init__(self, *args: str, log: Path):
        self.port, self.log = free_port(), log
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        self.proc = subprocess.Popen([str(mlflow_bin), *args, "--host", "127.0.0.1", "--port",
                                      str(self.port)], env=_env(), stdout=log.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        deadline = time.time() + 180
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(1)
        raise AssertionError(f"mlflow did not come up: {self.log.read_text()[-3000:]}")

    def __exit__(self, *exc):
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its workers, only
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from malloc_ray.study.tracking import study_tracking_uri

    study_dir = run_smoke_study(tmp_path_factory.mktemp("mlflow-ui"))
    info = json.loads((study_dir / "study.json").read_text())
    return {"dir": study_dir, "uri": study_tracking_uri(study_dir, info), "info": info,
            "experiment_id": info["mlflow"]["experiment_id"],
            "parent_run_id": info["mlflow"]["parent_run_id"]}


def recorded(uri: str, experiment: str) -> dict:
    """What MLflow holds of a study, without ids, times or values that vary between runs."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from malloc_ray.study.tracking import SUMMARY_TABLE

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    out = {"experiment_tags": {k: v for k, v in exp.tags.items() if k.startswith("mlflow.exp")},
           "runs": {}}
    for run in runs:
        tags = run.data.tags
        key = (tags["malloc.role"], run.info.run_name)
        out["runs"][key] = {
            "tags": {k: tags.get(k) for k in ("study", "method", "depth", "seed", "dataset_id",
                                              "config_hash", "dataset")},
            "params": sorted(run.data.params),
            "metrics": sorted(k for k in run.data.metrics if not k.startswith("system/")),
            "system_metrics": sorted(k for k in SYSTEM_METRICS if k in run.data.metrics),
            "datasets": sorted((d.dataset.name, d.dataset.digest, d.dataset.source,
                                d.dataset.profile, tuple(t.value for t in d.tags))
                               for d in run.inputs.dataset_inputs),
            "artifacts": sorted(a.path for a in client.list_artifacts(run.info.run_id)),
            "parent": tags.get("mlflow.parentRunId") is not None}
        if tags["malloc.role"] == "study":
            # the file `log_table` wrote (`load_table` finds it through a tag search that an
            # MLflow 3.17 server answers with nothing; the file is the same either way)
            import tempfile

            import pandas as pd

            with tempfile.TemporaryDirectory() as tmp:
                path = client.download_artifacts(run.info.run_id, SUMMARY_TABLE, tmp)
                out["summary"] = pd.read_json(path, orient="split")
            out["logged_artifacts"] = tags.get("mlflow.loggedArtifacts")
            out["pareto"] = sorted(a.path for a in client.list_artifacts(run.info.run_id,
                                                                         "pareto"))
    del mlflow
    return out


# -- acceptance 2: the record, through mlflow.search_runs ----------------------------------------
def test_search_runs_shows_every_child_with_dataset_and_system_metrics(study):
    import mlflow
    import pandas as pd

    from malloc_ray.study.tracking import use_tracking_uri

    use_tracking_uri(study["uri"])
    runs = mlflow.search_runs(experiment_ids=[study["experiment_id"]], output_format="list")
    trials = pd.read_parquet(study["dir"] / "trials.parquet")
    parent = next(r for r in runs if r.data.tags["malloc.role"] == "study")
    children = [r for r in runs if r.data.tags["malloc.role"] == "trial"]
    assert len(children) == len(trials) >= 2
    assert parent.data.tags["study"] == "quickstart-smoke"
    meta = json.loads((study["dir"] / "data" / "kuai" / "meta.json").read_text())
    for run in [parent, *children]:
        (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]
        assert (dataset.name, dataset.digest) == ("kuai", meta["dataset_id"])
        profile = json.loads(dataset.profile)
        assert profile["users"] == meta["stats"]["users"]
        assert profile["label_stream_auc"] == meta["stats"]["label_stream_auc"]
        assert set(profile) >= {"items", "interactions", "max_length", "avg_length",
                                "positive_rate"}
    for run in children:
        tags, metrics = run.data.tags, run.data.metrics
        assert run.info.run_name == f"{tags['method']} d{tags['depth']} s{tags['seed']}"
        assert set(SYSTEM_METRICS) <= set(metrics), sorted(metrics)
        assert metrics["peak_rss_bytes"] > 1e7 and metrics["peak_memory_bytes"] > 0
        # one name per quantity: the test metrics say so, the best epoch's valid AUC is not
        # the per-epoch curve
        assert {"test_auc", "test_logloss", "best_valid_auc", "kv_bytes_per_user",
                "macs_per_request"} <= set(metrics)
        assert not {"auc", "gauc", "logloss", "seconds"} & set(metrics)
        assert metrics["test_auc"] == pytest.approx(
            trials.set_index("trial_id").loc[tags["config_hash"], "auc"])
    cpu = mlflow.tracking.MlflowClient(study["uri"]).get_metric_history(
        children[0].info.run_id, "system/cpu_utilization_percentage")
    assert cpu and all(0 <= m.value <= 100 * os.cpu_count() for m in cpu)

    rec = recorded(study["uri"], "quickstart-smoke")
    summary = rec["summary"]
    cells = trials[["dataset", "method", "depth"]].drop_duplicates()
    assert len(summary) == len(cells)
    assert not summary.duplicated(["dataset", "method", "depth"]).any()
    assert set(map(tuple, summary[["method", "depth"]].to_numpy())) == set(
        map(tuple, trials[["method", "depth"]].to_numpy()))
    assert {"test_gauc", "test_gauc_ci95", "kv_bytes_per_user", "kv_payload_bytes_per_user",
            "macs_per_request", "verdict_vs_native", "delta_test_gauc_vs_native",
            "on_front_gauc_bytes", "on_front_gauc_macs"} <= set(summary.columns)
    report = pd.read_csv(study["dir"] / "report" / "summary.csv")
    merged = summary.merge(report, on=["dataset", "method", "depth"])
    assert merged["test_gauc"].fillna(-1).tolist() == pytest.approx(
        merged["gauc"].fillna(-1).tolist())
    assert rec["pareto"] == ["pareto/fig4_gauc_macs.png", "pareto/pareto_gauc_bytes.png"]
    # the trials table still reads back from MLflow alone, under today's metric names
    from malloc_ray.study.results import table_from_mlflow

    rebuilt = table_from_mlflow(study["uri"], "quickstart-smoke").set_index("trial_id")
    for trial_id, row in trials.set_index("trial_id").iterrows():
        assert rebuilt.loc[trial_id, "auc"] == pytest.approx(row["auc"])
        assert rebuilt.loc[trial_id, "valid_auc"] == pytest.approx(row["valid_auc"])
        assert len(json.loads(rebuilt.loc[trial_id, "history"])) == len(json.loads(
            row["history"]))


# -- acceptance 3: a tracking server records the same ---------------------------------------------
def test_a_study_on_a_tracking_server_records_the_same(study, tmp_path):
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    with MlflowProcess("server", "--backend-store-uri", f"sqlite:///{server_dir / 'mlflow.db'}",
                       "--artifacts-destination", str(server_dir / "artifacts"),
                       "--workers", "1", log=tmp_path / "server.log") as server:
        study_dir = run_smoke_study(tmp_path / "out", "--mlflow-tracking-uri", server.url)
        info = json.loads((study_dir / "study.json").read_text())
        assert info["mlflow"]["tracking_uri"] == server.url
        assert not (study_dir / "mlflow.db").exists()  # nothing went to a sqlite file
        on_server = recorded(server.url, "quickstart-smoke")
    local = recorded(study["uri"], "quickstart-smoke")
    assert on_server["experiment_tags"] == local["experiment_tags"] == {
        "mlflow.experimentKind": "custom_model_development"}
    assert set(on_server["runs"]) == set(local["runs"])
    for key, run in local["runs"].items():
        assert on_server["runs"][key] == run, key
    cols = ["dataset", "method", "depth"]
    assert list(on_server["summary"].columns) == list(local["summary"].columns)
    assert on_server["summary"][cols].values.tolist() == local["summary"][cols].values.tolist()
    assert on_server["pareto"] == local["pareto"]


# -- acceptance 1: the MLflow UI -------------------------------------------------------------------
def _row_texts(name: str) -> str:
    """JS: the whole runs-table row (pinned and scrolled parts) of the run named `name`."""
    return (f"(() => {{ const cell = [...document.querySelectorAll('.ag-row')].find(r => "
            f"r.innerText.split('\\n').map(s => s.trim()).includes({json.dumps(name)})); "
            "if (!cell) return ''; const i = cell.getAttribute('row-index'); "
            "return [...document.querySelectorAll(`.ag-row[row-index='${i}']`)]"
            ".map(r => r.innerText).join(' | '); })()")


async def _tour(ui: str, study: dict, chromium: str, profile: Path, names: list[str]) -> dict:
    exp, parent = study["experiment_id"], study["parent_run_id"]
    seen = {}
    async with Browser(chromium, profile, width=1700, height=1000) as b:
        # Same origin, before the app loads: the assistant panel MLflow opens on a first visit
        # would cover half of every screenshot.
        await b.goto(f"{ui}/health")
        await b.wait_for("document.readyState === 'complete'")
        await b.eval("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', "
                     "'true'); localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false')")
        # The experiments list, as a new user starts.
        await b.goto(f"{ui}/#/experiments")
        await b.wait_for_text("quickstart-smoke")
        await b.goto(f"{ui}/#/experiments/{exp}")
        await b.wait_for_text("Model training")
        await asyncio.sleep(3)
        seen["first_visit"] = await b.location()
        if "/runs" not in seen["first_visit"]:
            # MLflow 3.17 opens a fresh browser on its GenAI side whatever the experiment's
            # kind: one click on "Model training", which the browser then remembers.
            assert await b.click_text("Model training")
            await asyncio.sleep(2)
        await b.goto(f"{ui}/#/experiments")
        await b.wait_for_text("quickstart-smoke")
        await b.goto(f"{ui}/#/experiments/{exp}")
        seen["landing_text"] = await b.wait_for_text("Run Name", "Dataset", "quickstart-smoke")
        seen["landing"] = await b.location()
        # The children are nested under the study's row: expand it.
        assert await b.wait_for("(() => { const b = document.querySelector("
                                "'.ag-row button[data-component-id*=runnamecellrenderer]'); "
                                "if (!b) return false; b.click(); return true; })()",
                                what="the study row's expander")
        seen["runs_text"] = await b.wait_for_text(*names)
        seen["child_row"] = await b.eval(_row_texts(names[0]))
        seen["parent_row"] = await b.eval(_row_texts("quickstart-smoke"))
        await b.screenshot(SCREENSHOTS / "mlflow-runs.png")
        # The chart view of the same runs (one card per metric, system metrics included).
        assert await b.eval("(() => { const r = document.querySelector("
                            "'input[type=radio][value=CHART]'); if (!r) return false; "
                            "(r.closest('label') || r).click(); return true; })()")
        seen["charts_text"] = await b.wait_for_text("Model metrics", "best_valid_auc")
        await asyncio.sleep(3)
        await b.screenshot(SCREENSHOTS / "mlflow-charts.png")
        # The parent's trade-off table, rendered by the artifact viewer.
        await b.goto(f"{ui}/#/experiments/{exp}/runs/{parent}/artifacts/trade_off_summary.json")
        seen["table_text"] = await b.wait_for_text("View as table", "verdict_vs_native",
                                                   "test_gauc", "native")
        seen["table_rows"] = await b.eval(
            "[...document.querySelectorAll('table tbody tr, [role=row]')].length")
        await b.screenshot(SCREENSHOTS / "mlflow-summary-table.png")
        # The Pareto figures: open the `pareto` folder of the artifact tree, then a figure.
        assert await b.click_text("pareto")
        await b.wait_for_text("pareto_gauc_bytes.png")
        assert await b.click_text("pareto_gauc_bytes.png")
        seen["figure"] = await b.wait_for(
            "(() => { const i = [...document.querySelectorAll('img')].find(i => i.complete && "
            "i.naturalWidth > 300); return i ? i.naturalWidth : 0; })()",
            what="the Pareto figure")
        await b.screenshot(SCREENSHOTS / "mlflow-pareto-figure.png")
    return seen


def test_the_mlflow_ui_opens_on_the_study(study, tmp_path):
    import pandas as pd

    chromium = ensure_chromium()
    trials = pd.read_parquet(study["dir"] / "trials.parquet")
    names = sorted(f"{m} d{d} s{s}" for m, d, s in trials[["method", "depth", "seed"]]
                   .itertuples(index=False))
    meta = json.loads((study["dir"] / "data" / "kuai" / "meta.json").read_text())
    with MlflowProcess("ui", "--backend-store-uri", study["uri"],
                       log=tmp_path / "ui.log") as ui:
        seen = asyncio.run(_tour(ui.url, study, chromium, tmp_path / "profile", names))
    # the experiment's landing page (once the browser is on "Model training") is the runs table
    assert f"/experiments/{study['experiment_id']}/runs" in seen["landing"]
    for name in names:  # the parent and every child
        assert name in seen["runs_text"]
    # a child's Dataset column names the dataset (and its digest: the dataset id)
    assert f"kuai ({meta['dataset_id']})" in seen["child_row"], seen["child_row"]
    assert "kuai" in seen["parent_row"]
    # the parent's summary table renders as a table: a header and one row per cell
    assert seen["table_rows"] >= 1 + len(names)
    assert seen["figure"] > 300
    for shot in ("mlflow-runs", "mlflow-charts", "mlflow-summary-table", "mlflow-pareto-figure"):
        from matplotlib.image import imread

        pixels = imread(SCREENSHOTS / f"{shot}.png")
        assert pixels.shape[0] >= 900 and pixels.shape[1] >= 1600
