"""MLflow layout of a study: one experiment, one parent run (the study), one child per cell.

The driver creates the experiment and the parent run before any trial starts: several trial
processes initialising a fresh sqlite store at once race in its schema migration. Trials then
log through `MlflowClient` with the URI passed explicitly, never through global state.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROLE_TAG, STUDY_TAG = "malloc.role", "malloc.study"
CHILD_TAGS = ("method", "category", "workflow", "depth", "seed", "dataset_id", "config_hash",
              "status")
FINAL_METRICS = ("auc", "gauc", "logloss", "valid_auc", "best_epoch", "epochs_run",
                 "kv_bytes_per_user", "kv_payload_bytes_per_user", "macs_per_request",
                 "macs_prefill", "peak_memory_bytes", "estimated_memory_bytes", "train_seconds",
                 "samples_per_second")


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
    return f"sqlite:///{Path(study_dir).resolve() / 'mlflow.db'}"


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


def start_study_run(tracking_uri: str, study_name: str, study_dir: Path,
                    params: dict | None = None) -> StudyRun:
    """Experiment + parent run, reusing the parent of an earlier run of the same study."""
    from mlflow.tracking import MlflowClient

    use_tracking_uri(tracking_uri)  # creates/migrates the store once, in the driver
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(study_name)
    if experiment is None:
        artifacts = (Path(study_dir).resolve() / "mlartifacts").as_uri()
        experiment_id = client.create_experiment(study_name, artifact_location=artifacts)
    else:
        experiment_id = experiment.experiment_id
    parents = client.search_runs([experiment_id],
                                 filter_string=f"tags.`{ROLE_TAG}` = 'study'", max_results=1)
    if parents:
        parent_id = parents[0].info.run_id
        client.update_run(parent_id, status="RUNNING")
    else:
        parent = client.create_run(experiment_id, run_name=study_name,
                                   tags={ROLE_TAG: "study", STUDY_TAG: study_name})
        parent_id = parent.info.run_id
        for key, value in (params or {}).items():
            client.log_param(parent_id, key, str(value)[:6000])
    return StudyRun(tracking_uri, experiment_id, parent_id)


def finish_study_run(run: StudyRun, status: str = "FINISHED") -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(run.tracking_uri).set_terminated(run.parent_run_id, status=status)


class ChildRun:
    """One cell's MLflow child run: tags, per-epoch metrics, final metrics, config artifact.
    `params` are logged beside the config's fields (facts about the cell's data, not config)."""

    def __init__(self, run: StudyRun, name: str, tags: dict, config: dict,
                 params: dict | None = None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(run.tracking_uri)
        self._drop_unfinished(run, tags["config_hash"])
        all_tags = {"mlflow.parentRunId": run.parent_run_id, ROLE_TAG: "trial",
                    **{k: str(v) for k, v in tags.items()}}
        self.run_id = self.client.create_run(run.experiment_id, run_name=name,
                                             tags=all_tags).info.run_id
        for key, value in {**config, **(params or {})}.items():
            self.client.log_param(self.run_id, key, json.dumps(value) if isinstance(value, dict)
                                  else str(value))
        self.log_json(config, "config.json")

    def _drop_unfinished(self, run: StudyRun, config_hash: str) -> None:
        # A cell interrupted by a killed driver left a RUNNING child; its restart replaces it,
        # so each cell keeps exactly one child run.
        stale = self.client.search_runs(
            [run.experiment_id],
            filter_string=f"tags.config_hash = '{config_hash}' and attributes.status != 'FINISHED'")
        for old in stale:
            self.client.delete_run(old.info.run_id)

    def log_epoch(self, record: dict) -> None:
        from mlflow.entities import Metric

        step, now = int(record["epoch"]), _now_ms()
        metrics = [Metric(k, float(v), now, step) for k, v in record.items()
                   if k != "epoch" and isinstance(v, (int, float)) and v == v]
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
        metrics = [Metric(k, float(result[k]), now, step) for k in FINAL_METRICS
                   if isinstance(result.get(k), (int, float)) and result[k] == result[k]]
        self.client.log_batch(self.run_id, metrics=metrics)
        if result.get("history"):
            self.log_curves(result)
        self.client.set_tag(self.run_id, "status", result["status"])
        if result.get("failed_epoch") is not None:
            self.client.set_tag(self.run_id, "failed_epoch", str(result["failed_epoch"]))
        if result.get("reason"):
            self.client.set_tag(self.run_id, "reason", str(result["reason"])[:5000])
        self.log_json(result, "result.json")
        self.client.set_terminated(self.run_id, status="FINISHED" if result["status"] != "error"
                                   else "FAILED")


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
