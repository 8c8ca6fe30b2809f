"""MLflow layout of a study: one experiment, one parent run (the study), one child per cell.

The driver creates the experiment and the parent run before any trial starts: several trial
processes initialising a fresh sqlite store at once race in its schema migration. Trials then
log through `MlflowClient` with the URI passed explicitly, never through global state.

Exactly one child run per cell, whatever is killed when: the cell's result file
(`<study>/trials/<id>.json`) is the truth and names its run (`mlflow_run_id`). A trial deletes
the other child runs of its cell when it starts and again once its run is finished, and the
driver reconciles MLflow with the result files before and after every run of the study
(`reconcile_children`): the run a result names is finished from the result if a crash left it
RUNNING, re-created if it is gone, and every other child run of that cell is deleted.

A study directory is relocatable (docs/study.md, "Moving a study"): its default store is
`<study>/mlflow.db`, found from the study directory as it is now, and MLflow's absolute
artifact locations (`file:///<where it was>/mlartifacts/...`) are rewritten to the study's
current `mlartifacts/` when the store is opened from a study that has moved
(`relocate_artifacts`). A sqlite store that is missing is an error, never created empty.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from malloc_ray.errors import InputError

ROLE_TAG, STUDY_TAG = "malloc.role", "malloc.study"
STORE_NAME, ARTIFACTS_NAME = "mlflow.db", "mlartifacts"  # the default store, in the study dir
CHILD_TAGS = ("method", "category", "workflow", "depth", "seed", "dataset_id", "config_hash",
              "status")
FINAL_METRICS = ("auc", "gauc", "logloss", "valid_auc", "best_epoch", "epochs_run",
                 "kv_bytes_per_user", "kv_payload_bytes_per_user", "macs_per_request",
                 "macs_prefill", "peak_memory_bytes", "estimated_memory_bytes", "train_seconds",
                 "samples_per_second")
# One MLflow name per quantity, so the UI's charts and columns never mix two meanings: the
# result's test metrics are `test_*`, the best epoch's validation AUC is not the per-epoch
# `valid_auc` curve, and an epoch's wall time says it is one. Fields not listed keep their name.
FINAL_METRIC_NAMES = {"auc": "test_auc", "gauc": "test_gauc", "logloss": "test_logloss",
                      "valid_auc": "best_valid_auc"}
EPOCH_METRIC_NAMES = {"seconds": "epoch_seconds"}
# The peak resident memory of the trial's process, sampled with the system metrics.
PEAK_RSS_METRIC = "peak_rss_bytes"
SUMMARY_TABLE = "trade_off_summary.json"  # the parent run's `mlflow.log_table` artifact
PARETO_FIGURES_DIR = "pareto"  # the parent run's Pareto figures (PNG artifacts)


def final_metric_name(field: str) -> str:
    """The MLflow metric a result field is logged as."""
    return FINAL_METRIC_NAMES.get(field, field)


def epoch_metric_name(field: str) -> str:
    """The MLflow metric an epoch record's field is logged as (step = epoch)."""
    return EPOCH_METRIC_NAMES.get(field, field)


def run_name(method: str, depth, seed) -> str:
    """A child run's name: short, and sorted and read as the runs table nests them."""
    return f"{method} d{depth} s{seed}"


def use_tracking_uri(uri: str) -> None:
    """Point this process's `mlflow` calls at `uri` without exporting it: `mlflow.set_tracking_uri`
    also sets MLFLOW_TRACKING_URI, which the next study in this process (or any child process)
    would then take as its own store."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def default_tracking_uri(study_dir: Path) -> str:
    return f"sqlite:///{Path(study_dir).resolve() / STORE_NAME}"


def sqlite_store_path(uri: str | None) -> Path | None:
    """The database file of a `sqlite:///` tracking URI; None for any other store."""
    if not uri or not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def store_in_study(uri: str | None, study_dir: Path) -> str | None:
    """The store's path relative to the study dir when it is a sqlite file inside it."""
    path = sqlite_store_path(uri)
    if path is None:
        return None
    try:
        return path.resolve().relative_to(Path(study_dir).resolve()).as_posix()
    except ValueError:
        return None


def recorded_mlflow(tracking_uri: str, study_dir: Path) -> dict:
    """What study.json records of the store: relative to the study dir when it is inside it
    (`store`), the URI otherwise: nothing in a study directory names where it used to be."""
    store = store_in_study(tracking_uri, study_dir)
    if store is not None:
        return {"store": store, "artifact_root": ARTIFACTS_NAME, "tracking_uri": None}
    return {"store": None, "tracking_uri": tracking_uri}


def study_tracking_uri(study_dir: Path, info: dict | None = None,
                       override: str | None = None) -> str:
    """The tracking URI of an existing study, from the study directory as it is now.

    `override` (--mlflow-tracking-uri) wins; else the store recorded relative to the study dir;
    else a recorded URI (an MLflow server, or a sqlite file outside the study). A study.json
    written before stores were recorded relative holds the absolute URI of the place it ran
    in: a sqlite file inside that old study dir is taken from the current one instead."""
    study_dir = Path(study_dir).resolve()
    if override:
        return override
    mlflow_info = (info or {}).get("mlflow") or {}
    if mlflow_info.get("store"):
        return f"sqlite:///{study_dir / mlflow_info['store']}"
    uri = mlflow_info.get("tracking_uri")
    if not uri:
        return default_tracking_uri(study_dir)
    path, spec = sqlite_store_path(uri), (info or {}).get("spec") or {}
    if path is not None and spec.get("output_dir") and spec.get("name"):
        old_dir = Path(spec["output_dir"]) / spec["name"]
        try:
            return f"sqlite:///{study_dir / path.relative_to(old_dir)}"
        except ValueError:
            pass
    return uri


def store_exists(uri: str) -> bool:
    """False only for a sqlite store whose file is not there (other stores: not checked)."""
    path = sqlite_store_path(uri)
    return path is None or path.is_file()


def require_store(uri: str, what: str = "the study's MLflow store",
                  hint: str = "pass --mlflow-tracking-uri with where it is now") -> None:
    """A sqlite store that is not there is an error: opening it would create an empty one."""
    if not store_exists(uri):
        raise InputError(f"{what} is missing (a moved study takes its {STORE_NAME} along); "
                         f"{hint}", file=str(sqlite_store_path(uri)))


def check_study_store(tracking_uri: str, study_dir: Path) -> None:
    """A study that has finished cells has a store: if its sqlite file is not there (a study
    copied without its mlflow.db, a URI that names the old place), stop, naming it."""
    if any((Path(study_dir) / "trials").glob("*.json")):
        require_store(tracking_uri, "the MLflow store of this study (it has finished cells)")


def relocate_artifacts(tracking_uri: str, study_dir: Path) -> int:
    """Point a moved study's MLflow artifact locations at its current `mlartifacts/`.

    MLflow records absolute artifact URIs (experiment and runs). When the store is the sqlite
    file inside the study directory and the study has moved (or been copied), those URIs name
    the old place: anything logged, and what the UI shows, would go there. They are rewritten
    in place to the same paths under the current study directory. Only locations of this
    study's own layout (`.../mlartifacts`) are touched; other stores are left alone. Returns
    the number of experiments rewritten."""
    import sqlite3
    from contextlib import closing

    if store_in_study(tracking_uri, study_dir) is None:
        return 0
    path = sqlite_store_path(tracking_uri)
    if not path.is_file():
        return 0
    new_root = (Path(study_dir).resolve() / ARTIFACTS_NAME).as_uri()
    moved = 0
    with closing(sqlite3.connect(str(path), timeout=60)) as db, db:  # one transaction
        tables = {r[0] for r in db.execute("select name from sqlite_master where type='table'")}
        if not {"experiments", "runs"} <= tables:
            return 0
        # the columns that hold absolute artifact URIs below an experiment's root
        children = [("runs", "artifact_uri")] + (
            [("logged_models", "artifact_location")] if "logged_models" in tables else [])
        rows = db.execute("select experiment_id, artifact_location from experiments").fetchall()
        for experiment_id, old_root in rows:
            old_root = (old_root or "").rstrip("/")
            if (old_root == new_root or not old_root.startswith("file:")
                    or not old_root.endswith("/" + ARTIFACTS_NAME)):
                continue
            db.execute("update experiments set artifact_location = ? where experiment_id = ?",
                       (new_root, experiment_id))
            for table, column in children:
                db.execute(f"update {table} set {column} = ? || substr({column}, ?) "
                           f"where experiment_id = ? and substr({column}, 1, ?) = ?",
                           (new_root, len(old_root) + 1, experiment_id, len(old_root) + 1,
                            old_root + "/"))
            moved += 1
    return moved


def artifact_root_missing(client, run_id: str, study_dir: Path) -> str | None:
    """The local artifact root of a run when it is outside the study dir and gone (a store
    opened away from where it ran): logging there would create it. None when fine."""
    from urllib.parse import unquote, urlparse

    run = client.get_run(run_id)
    root = client.get_experiment(run.info.experiment_id).artifact_location or ""
    if not root.startswith("file:"):
        return None
    path = Path(unquote(urlparse(root).path))
    try:
        path.resolve().relative_to(Path(study_dir).resolve())
        return None
    except ValueError:
        return None if path.is_dir() else str(path)


def create_store(uri: str) -> None:
    """Create a sqlite store that is not there yet whole or not at all: MLflow builds its
    schema in dozens of migration steps, and a driver killed among them would leave a file no
    later run can open ("table ... already exists"). So the schema is built in a temporary
    file beside it, renamed into place once complete; what a killed build left is removed."""
    path = sqlite_store_path(uri)
    if path is None or path.exists():
        return
    from mlflow.tracking import MlflowClient

    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    # a new name each time: MLflow caches a store (and its open engine) per URI
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        MlflowClient(f"sqlite:///{tmp}").search_experiments(max_results=1)  # builds the schema
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def open_study_store(tracking_uri: str, study_dir: Path) -> None:
    """What a reader of a finished study (the report) does before it touches MLflow: the store
    must exist (else a one-line error, never an empty store at the old place), and a moved
    study's artifact locations are pointed at its current directory."""
    require_store(tracking_uri, hint="pass --mlflow-tracking-uri with where it is now, or "
                                     "--no-mlflow to build the report without MLflow")
    relocate_artifacts(tracking_uri, study_dir)


def resolve_tracking_uri(spec_uri: str | None, study_dir: Path) -> str:
    """The spec's URI (a CLI flag overrides it there), else MLFLOW_TRACKING_URI (how a cluster
    job is pointed at its MLflow server), else sqlite under the study dir."""
    return spec_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(study_dir)


@dataclass
class StudyRun:
    """What a trial needs to log its child run (plain data: it travels to Ray workers)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
DATASET_CONTEXT_TAG = "mlflow.data.context"


# -- datasets ------------------------------------------------------------------------------------
def dataset_input(name: str, directory: str | Path, context: str,
                  study_dir: str | Path | None = None):
    """An MLflow dataset input for a prepared dataset: its id as the digest, its Table-1 stats
    and label-stream audit (meta.json) as the profile, its directory (relative to the study
    when inside it) as the source. The UI's Dataset column and dataset view show these."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from malloc_ray.data.prepare import dataset_stats
    from malloc_ray.study.provenance import relative_to_study

    stats = dataset_stats(directory)
    profile = {k: v for k, v in stats.items() if k not in ("name", "dataset_id")}
    source = {"uri": relative_to_study(Path(directory), study_dir)}
    dataset = Dataset(name=name, digest=str(stats["dataset_id"])[:36], source_type="local",
                      source=json.dumps(source), profile=json.dumps(profile))
    return DatasetInput(dataset, tags=[InputTag(DATASET_CONTEXT_TAG, context)])


def log_datasets(client, run_id: str, datasets: dict[str, str], context: str,
                 study_dir: str | Path | None = None) -> None:
    """Log each `name -> directory` as a dataset input of the run (not twice: a resumed study
    logs its parent's inputs again, which MLflow then keeps once)."""
    have = {(d.dataset.name, d.dataset.digest) for d in client.get_run(run_id).inputs.dataset_inputs}
    inputs = [dataset_input(name, directory, context, study_dir)
              for name, directory in sorted(datasets.items())]
    inputs = [i for i in inputs if (i.dataset.name, i.dataset.digest) not in have]
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


# -- system metrics ------------------------------------------------------------------------------
# A trial lasts seconds (post-hoc, smoke) to hours. The machine is sampled every second and the
# mean of a window is logged as one step of MLflow's `system/*` metrics; the windows double from
# 1 s to 60 s. A trial of seconds gets a few points (always one at its end), an hour ~65, ten
# hours ~600: enough to see a run's shape without flooding the store. MLflow's own
# MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL / _SAMPLES_BEFORE_LOGGING, when set, fix both instead.
SYSTEM_SAMPLE_SECONDS = 1.0
SYSTEM_MAX_WINDOW = 60  # samples


def _trial_monitor_class():
    import psutil
    from mlflow.environment_variables import MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING
    from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class ProcessMonitor(BaseMetricsMonitor):
        """The trial's own process (and its children): what the machine-wide numbers share
        with other trials on the same node."""

        def __init__(self):
            super().__init__()
            self.process, self.peak_rss = psutil.Process(), 0

        def collect_metrics(self):
            try:
                procs = [self.process, *self.process.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in procs)
            except psutil.Error:
                return
            self.peak_rss = max(self.peak_rss, rss)
            self._metrics["process_memory_rss_megabytes"].append(rss / 1e6)

        def aggregate_metrics(self):
            return {k: round(sum(v) / len(v), 1) for k, v in self._metrics.items() if v}

    class TrialSystemMetrics(SystemMetricsMonitor):
        """MLflow's system metrics monitor (CPU, memory, disk, network; GPU through NVML where
        there is one) on a growing logging window, flushed when the trial ends."""

        def __init__(self, run_id: str, tracking_uri: str):
            super().__init__(run_id, sampling_interval=SYSTEM_SAMPLE_SECONDS,
                             tracking_uri=tracking_uri)
            self.process_monitor = ProcessMonitor()
            self.monitors.append(self.process_monitor)
            self.fixed_window = MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING.get()
            self._pending = 0

        def monitor(self):
            psutil.cpu_percent()  # the first call (per thread) only starts psutil's CPU clock
            window = 1
            while not self._shutdown_event.wait(self.sampling_interval):
                self.collect_metrics()
                self._pending += 1
                if self._pending >= (self.fixed_window or window):
                    self._publish()
                    window = min(window * 2, SYSTEM_MAX_WINDOW)

        def _publish(self):
            try:
                self.publish_metrics(self.aggregate_metrics())
            except Exception:  # noqa: BLE001 - system metrics never fail a trial
                pass
            self._pending = 0

        def finish(self):
            """Stop sampling; log what the last window holds (one sample at least)."""
            self._shutdown_event.set()
            if self._process is not None:
                self._process.join()
                self._process = None
            if self._pending == 0 and self._logging_step == 0:
                self.collect_metrics()
                self._pending = 1
            if self._pending:
                self._publish()
            self.mlflow_logger.flush()

    return TrialSystemMetrics


def start_system_metrics(run_id: str, tracking_uri: str):
    """Start sampling system metrics into the run; None where MLflow cannot (no psutil)."""
    import logging

    # MLflow announces every monitor it starts (and that it skips GPUs) at INFO on stderr:
    # per trial that is noise in the CLI's output, which keeps stderr for errors and progress.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    try:
        monitor = _trial_monitor_class()(run_id, tracking_uri)
    except Exception as exc:  # noqa: BLE001 - a trial runs without them, saying so
        logging.getLogger(__name__).warning("no system metrics for run %s: %r", run_id, exc)
        return None
    monitor.start()
    return monitor


# -- the trade-off summary on the parent run ------------------------------------------------------
SUMMARY_COLUMNS = {  # summary column (pareto.pareto_table) -> column of the logged table
    # what a reader compares first: the cell, its accuracy and interval, the verdict, the costs
    "dataset": "dataset", "method": "method", "depth": "depth",
    "gauc": "test_gauc", "gauc_ci95": "test_gauc_ci95",
    "delta_gauc_vs_native": "delta_test_gauc_vs_native",
    "delta_gauc_vs_native_ci95": "delta_test_gauc_vs_native_ci95",
    "verdict_vs_native": "verdict_vs_native",
    "kv_bytes_per_user": "kv_bytes_per_user",
    "kv_payload_bytes_per_user": "kv_payload_bytes_per_user",
    "macs_per_request": "macs_per_request",
    "front_gauc_macs": "on_front_gauc_macs", "front_gauc_bytes": "on_front_gauc_bytes",
    "front_gauc_macs_bytes": "on_front_gauc_macs_bytes",
    "auc": "test_auc", "auc_ci95": "test_auc_ci95", "logloss": "test_logloss",
    "logloss_ci95": "test_logloss_ci95",
    "n_seeds": "n_seeds", "n_ok": "n_ok", "n_failed": "n_failed",
    "failed_statuses": "failed_statuses", "n_pairs_vs_native": "n_pairs_vs_native",
    "label": "label", "hparams": "hparams", "category": "category", "workflow": "workflow",
}


def summary_frame(summary):
    """The trade-off summary (`pareto.pareto_table`) as the parent run's table: one row per
    (dataset, method, depth) (and hyperparameters, in a search), named as the metrics are."""
    cols = [c for c in SUMMARY_COLUMNS if c in summary.columns]
    return summary[cols].rename(columns=SUMMARY_COLUMNS).reset_index(drop=True)


def log_study_summary(client, run_id: str, summary, figures=()) -> None:
    """`mlflow.log_table` of the trade-off summary on the parent run (replacing the one an
    earlier report logged: log_table appends to an existing file) and the Pareto figures as
    image artifacts under `pareto/`."""
    if SUMMARY_TABLE in {a.path for a in client.list_artifacts(run_id)}:
        try:
            client._tracking_client._get_artifact_repo(run_id).delete_artifacts(SUMMARY_TABLE)
        except Exception:  # noqa: BLE001 - a store that cannot delete: the table is appended
            pass
    client.log_table(run_id, data=summary_frame(summary), artifact_file=SUMMARY_TABLE)
    for path in figures:
        client.log_artifact(run_id, str(path), artifact_path=PARETO_FIGURES_DIR)


def start_study_run(tracking_uri: str, study_name: str, study_dir: Path,
                    params: dict | None = None, datasets: dict[str, str] | None = None
                    ) -> StudyRun:
    """Experiment + parent run, reusing the parent of an earlier run of the same study.
    `datasets` (name -> prepared directory) are logged as the parent's dataset inputs."""
    from mlflow.tracking import MlflowClient

    relocate_artifacts(tracking_uri, study_dir)  # a moved study logs into its own directory
    create_store(tracking_uri)  # a new sqlite store appears complete or not at all
    use_tracking_uri(tracking_uri)  # migrates an older store once, in the driver
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(study_name)
    if experiment is None:
        artifacts = (Path(study_dir).resolve() / "mlartifacts").as_uri()
        experiment_id = client.create_experiment(study_name, artifact_location=artifacts)
    else:
        experiment_id = experiment.experiment_id
    # MLflow 3's UI opens an experiment without this tag on its GenAI overview (traces,
    # tokens): a study is model training, so it opens on the runs table.
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
    parents = client.search_runs([experiment_id],
                                 filter_string=f"tags.`{ROLE_TAG}` = 'study'", max_results=1)
    if parents:
        parent_id = parents[0].info.run_id
        client.update_run(parent_id, status="RUNNING")
        logged = parents[0].data.params
    else:
        parent = client.create_run(experiment_id, run_name=study_name,
                                   tags={ROLE_TAG: "study", STUDY_TAG: study_name,
                                         "study": study_name})
        parent_id, logged = parent.info.run_id, {}
    client.set_tag(parent_id, "study", study_name)  # also on a parent from before the tag
    if datasets:
        log_datasets(client, parent_id, datasets, "study", study_dir)
    # Only what the parent lacks (a driver killed right after creating it logged none).
    for key, value in (params or {}).items():
        if key not in logged:
            client.log_param(parent_id, key, str(value)[:6000])
    return StudyRun(tracking_uri, experiment_id, parent_id)


def finish_study_run(run: StudyRun, status: str = "FINISHED") -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(run.tracking_uri).set_terminated(run.parent_run_id, status=status)


class ChildRun:
    """One cell's MLflow child run: tags, per-epoch metrics, final metrics, config artifact.
    `params` are logged beside the config's fields (facts about the cell's data, not config)."""

    def __init__(self, run: StudyRun, name: str, tags: dict, config: dict,
                 params: dict | None = None, keep: str | None = None,
                 dataset: tuple[str, str] | None = None, study_dir: str | None = None,
                 system_metrics: bool = True):
        """`keep`: the run the cell's current result file names (a re-run of a failed cell):
        it stays until this run has replaced it (`drop_others`). `dataset`: (name, prepared
        directory), logged as the run's dataset input. `system_metrics`: sample the machine
        into the run until `finish`."""
        from mlflow.tracking import MlflowClient

        self.client, self.study, self.config_hash = (MlflowClient(run.tracking_uri), run,
                                                     tags["config_hash"])
        # Attempts a killed driver (or a crashed trial) left behind: each cell keeps one run.
        self.drop_others(keep=keep)
        all_tags = {"mlflow.parentRunId": run.parent_run_id, ROLE_TAG: "trial",
                    **{k: str(v) for k, v in tags.items()}}
        self.run_id = self.client.create_run(run.experiment_id, run_name=name,
                                             tags=all_tags).info.run_id
        for key, value in {**config, **(params or {})}.items():
            self.client.log_param(self.run_id, key, json.dumps(value) if isinstance(value, dict)
                                  else str(value))
        self.log_json(config, "config.json")
        if dataset is not None:
            self.log_dataset(*dataset, study_dir=study_dir)
        self.monitor = start_system_metrics(self.run_id, run.tracking_uri) if system_metrics \
            else None

    def log_dataset(self, name: str, directory: str, study_dir: str | None = None) -> None:
        """The cell's dataset as the run's input (what the UI's Dataset column shows); a
        dataset directory that cannot be read costs the run its input, never the trial."""
        import logging

        try:
            log_datasets(self.client, self.run_id, {name: directory}, "training", study_dir)
        except Exception as exc:  # noqa: BLE001
            logging.getLogger(__name__).warning("dataset input of run %s not logged: %r",
                                                self.run_id, exc)

    def drop_others(self, keep: str | None = None) -> None:
        """Delete every other child run of this cell (any status), except `keep`."""
        mine = {getattr(self, "run_id", None), keep}
        for old in cell_runs(self.client, self.study.experiment_id, self.config_hash):
            if old.info.run_id not in mine:
                self.client.delete_run(old.info.run_id)

    def log_epoch(self, record: dict) -> None:
        from mlflow.entities import Metric

        step, now = int(record["epoch"]), _now_ms()
        metrics = [Metric(epoch_metric_name(k), float(v), now, step) for k, v in record.items()
                   if k not in ("epoch", "pass") and isinstance(v, (int, float)) and v == v]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_json(self, obj: dict, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, name)
            with open(path, "w") as f:
                json.dump(obj, f, indent=2, default=str)
            self.client.log_artifact(self.run_id, path)

    def log_curves(self, result: dict) -> None:
        """The training-curves PNG people look for on a child run's artifacts tab."""
        from malloc_ray.study.curves import plot_run_curves

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "training_curves.png")
            plot_run_curves(result["history"], path, best_epoch=result.get("best_epoch"),
                            title=f"{result.get('method')} depth {result.get('depth')} "
                                  f"seed {result.get('seed')} ({result.get('status')})")
            self.client.log_artifact(self.run_id, path)

    def finish(self, result: dict) -> None:
        from mlflow.entities import Metric

        # Final values go one step past the last epoch, so MLflow shows them as the run's latest
        # and they never mix with the per-epoch `valid_auc` curve.
        now, step = _now_ms(), int(result.get("epochs_run") or 0)
        metrics = [Metric(final_metric_name(k), float(result[k]), now, step)
                   for k in FINAL_METRICS
                   if isinstance(result.get(k), (int, float)) and result[k] == result[k]]
        monitor = getattr(self, "monitor", None)
        if monitor is not None:  # the trial is over: its last window, and its peak memory
            monitor.finish()
            if monitor.process_monitor.peak_rss:
                metrics.append(Metric(PEAK_RSS_METRIC, float(monitor.process_monitor.peak_rss),
                                      now, step))
            self.monitor = None
        self.client.log_batch(self.run_id, metrics=metrics)
        if result.get("history"):
            self.log_curves(result)
        self.client.set_tag(self.run_id, "status", result["status"])
        if result.get("failed_epoch") is not None:
            self.client.set_tag(self.run_id, "failed_epoch", str(result["failed_epoch"]))
        if result.get("reason"):
            self.client.set_tag(self.run_id, "reason", str(result["reason"])[:5000])
        self.log_json(result, "result.json")
        self.client.set_terminated(self.run_id, status=terminal_status(result))


def terminal_status(result: dict) -> str:
    """The MLflow status of a finished cell's child run."""
    return "FAILED" if result["status"] == "error" else "FINISHED"


def cell_runs(client, experiment_id: str, config_hash: str | None = None) -> list:
    """The study's active child runs (of one cell when `config_hash` is given), all pages."""
    query = f"tags.`{ROLE_TAG}` = 'trial'"
    if config_hash is not None:
        query += f" and tags.config_hash = '{config_hash}'"
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=query, max_results=1000,
                                  page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


class _Existing(ChildRun):
    """A child run that already exists (reconcile finishes it from its result file)."""

    def __init__(self, client, run: StudyRun, run_id: str, config_hash: str):
        self.client, self.study, self.config_hash, self.run_id = client, run, config_hash, run_id


def reconcile_children(run: StudyRun, results: dict[str, dict], write_result=None) -> dict:
    """Make MLflow agree with the result files: one terminal child run per finished cell.

    For each result, the run it names is kept: finished from the result when a crash left it
    RUNNING (the result file is written before the run is finished), restored if deleted, and
    re-created from the result when it is gone from the store (the result file is then
    rewritten with the new id, through `write_result(trial_id, result)`). Every other child run
    of that cell is deleted. Child runs of cells without a result file are left to the trial
    that runs the cell next (it replaces them). Call it while no trial of the study runs.
    Returns counts of what was repaired."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(run.tracking_uri)
    counts = {"finished": 0, "deleted": 0, "restored": 0, "recreated": 0}
    by_cell: dict[str, list] = {}
    for child in cell_runs(client, run.experiment_id):
        by_cell.setdefault(child.data.tags.get("config_hash"), []).append(child)
    for trial_id, result in results.items():
        keep = result.get("mlflow_run_id")
        children = by_cell.get(trial_id, [])
        mine = next((c for c in children if c.info.run_id == keep), None)
        if mine is None and keep:
            try:
                found = client.get_run(keep)
            except MlflowException:
                found = None
            if found is not None and found.info.experiment_id == run.experiment_id:
                if found.info.lifecycle_stage == "deleted":
                    client.restore_run(keep)
                    counts["restored"] += 1
                mine = found
        if mine is None:  # its run is gone from the store: one from the result file
            mine = _recreate(client, run, result)
            result = {**result, "mlflow_run_id": mine.info.run_id}
            if write_result is not None:
                write_result(trial_id, result)
            counts["recreated"] += 1
        elif mine.info.status != terminal_status(result):
            _Existing(client, run, mine.info.run_id, trial_id).finish(result)
            counts["finished"] += 1
        for other in children:
            if other.info.run_id != mine.info.run_id:
                client.delete_run(other.info.run_id)
                counts["deleted"] += 1
    return counts


def _recreate(client, run: StudyRun, result: dict):
    tags = {"mlflow.parentRunId": run.parent_run_id, ROLE_TAG: "trial",
            "config_hash": result["trial_id"],
            **{k: str(result[k]) for k in CHILD_TAGS + ("dataset",)
               if k != "config_hash" and result.get(k) is not None}}
    created = client.create_run(run.experiment_id, run_name=run_name(
        result.get("method"), result.get("depth"), result.get("seed")), tags=tags)
    child = _Existing(client, run, created.info.run_id, result["trial_id"])
    directory = (result.get("config") or {}).get("dataset")
    if result.get("dataset") and directory:
        child.log_dataset(result["dataset"], directory)
    for key, value in (result.get("config") or {}).items():
        client.log_param(child.run_id, key, json.dumps(value) if isinstance(value, dict)
                         else str(value))
    child.finish(result)
    return client.get_run(child.run_id)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
