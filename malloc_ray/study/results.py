"""The trials table: one row per cell, with metrics and status, as `<study>/trials.parquet`.

It is built from the per-cell result files, or, if those are lost, from the study's MLflow
child runs (tags, params and final metrics hold the same fields).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from malloc_ray.files import read_parquet

COLUMNS = ["trial_id", "dataset", "dataset_id", "method", "category", "workflow", "depth",
           "seed", "status", "failed_epoch", "reason", "auc", "gauc", "logloss", "valid_auc",
           "best_epoch", "epochs_run", "kv_bytes_per_user", "kv_payload_bytes_per_user",
           "macs_per_request", "macs_prefill", "peak_memory_bytes", "estimated_memory_bytes",
           "gpu_fraction", "train_seconds", "samples_per_second", "mlflow_run_id", "started_at",
           "finished_at", "hparams", "history"]
# Per-epoch records (what the convergence curves plot), kept in the table as JSON text so that a
# report needs nothing but the table.
EPOCH_KEYS = ("train_loss", "valid_auc", "valid_gauc", "valid_logloss", "seconds")
# Results, tables and MLflow runs written before payload + metadata became the headline hold
# the payload in `kv_bytes_per_user` and the total under this name; they are read with today's
# meaning, so an old study's report never shows payload as the headline.
OLD_TOTAL_BYTES = "kv_bytes_per_user_with_metadata"
RENAMED_BYTES = {"kv_bytes_per_user": "kv_payload_bytes_per_user",
                 OLD_TOTAL_BYTES: "kv_bytes_per_user"}


def table_path(study_dir: str | Path) -> Path:
    return Path(study_dir) / "trials.parquet"


def finished_results(study_dir: str | Path) -> dict[str, dict]:
    """trial_id -> result of every cell that has finished (whatever its status)."""
    out = {}
    for path in sorted((Path(study_dir) / "trials").glob("*.json")):
        result = json.loads(path.read_text())
        out[result["trial_id"]] = result
    return out


def upgrade_bytes(result: dict) -> dict:
    """A result (or table row) in today's byte fields, whenever it was written."""
    if OLD_TOTAL_BYTES not in result:
        return result
    return {RENAMED_BYTES.get(k, k): v for k, v in result.items()}


def build_table(results: list[dict]) -> pd.DataFrame:
    results = [upgrade_bytes(r) for r in results]
    rows = [{**{c: r.get(c) for c in COLUMNS}, "history": _history_json(r.get("history")),
             "hparams": _hparams_json(r)} for r in results]
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["reason"] = table["reason"].astype("string")
    for col in ("failed_epoch", "best_epoch", "epochs_run", "depth", "seed"):
        table[col] = pd.to_numeric(table[col]).astype("Int64")  # None stays missing, not NaN
    return table.sort_values(["dataset", "method", "depth", "seed"]).reset_index(drop=True)


def _hparams_json(result: dict) -> str:
    """The cell's method hyperparameters as canonical JSON (what tells Optuna samples apart)."""
    value = result.get("hparams")
    if value is None:
        value = (result.get("config") or {}).get("hparams") or {}
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else {}
    return json.dumps(value, sort_keys=True)


def _history_json(history) -> str:
    if isinstance(history, str):
        return history
    return json.dumps([{k: v for k, v in rec.items() if k == "epoch" or k in EPOCH_KEYS}
                       for rec in (history or [])])


def history(row) -> list[dict]:
    """The per-epoch records of one trials-table row."""
    text = row.get("history") if hasattr(row, "get") else None
    return json.loads(text) if isinstance(text, str) and text else []


def write_table(table: pd.DataFrame, study_dir: str | Path) -> Path:
    path = table_path(study_dir)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    table.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def load_table(study_dir: str | Path, tracking_uri: str | None = None,
               experiment: str | None = None) -> pd.DataFrame:
    """The study's trials table; when the file is gone (or holds no rows) it is rebuilt from
    the per-cell result files, or, if those are lost too, from MLflow, and rewritten. A
    rebuild that finds no trial is an error and saves nothing."""
    path = table_path(study_dir)
    if path.exists():
        table = read_parquet(path).to_pandas()  # a corrupt file: an error naming it
        if len(table):  # a 0-row file (older versions saved one) is rebuilt, never trusted
            return table.rename(columns=RENAMED_BYTES) if OLD_TOTAL_BYTES in table else table
    results = finished_results(study_dir)
    if results:
        table = build_table(list(results.values()))
    elif tracking_uri is None or experiment is None:
        raise FileNotFoundError(f"{path} is missing, there are no result files in "
                                f"{Path(study_dir) / 'trials'} and no MLflow store was given to "
                                "rebuild it")
    else:
        table = table_from_mlflow(tracking_uri, experiment)
    if table.empty:
        from malloc_ray.errors import InputError

        raise InputError("no trials to rebuild the trials table from (no result files, no "
                         f"MLflow child runs of experiment {experiment!r}); nothing was saved",
                         file=str(path))
    write_table(table, study_dir)
    return table


def table_from_mlflow(tracking_uri: str, experiment: str) -> pd.DataFrame:
    import mlflow

    from malloc_ray.study.tracking import final_metric_name, use_tracking_uri

    use_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_names=[experiment],
                              filter_string="tags.`malloc.role` = 'trial'")
    client = mlflow.tracking.MlflowClient(tracking_uri)
    results = []
    for _, run in runs.iterrows():
        row = {"trial_id": run.get("tags.config_hash"), "mlflow_run_id": run["run_id"],
               "started_at": run["start_time"].timestamp() if run["start_time"] is not None else None,
               "finished_at": run["end_time"].timestamp() if run["end_time"] is not None else None}
        for col in (*COLUMNS, OLD_TOTAL_BYTES):
            # metrics under today's MLflow names (test_auc, ...), else as older runs named them
            for name in ("tags." + col, "metrics." + final_metric_name(col), "metrics." + col):
                value = run.get(name)
                if value is not None and value == value and col not in row:
                    row[col] = value
        for col in ("depth", "seed"):
            row[col] = int(row[col]) if row.get(col) is not None else None
        row["history"] = _history_from_mlflow(client, run["run_id"])
        row["hparams"] = run.get("params.hparams") or "{}"
        results.append(row)
    return build_table(results)


def _history_from_mlflow(client, run_id: str) -> list[dict]:
    """Per-epoch records from the metric histories (step = epoch), under today's MLflow names
    (`tracking.epoch_metric_name`) or those of older runs. Older runs also logged the final
    `valid_auc` after training, so the first value logged at each step is the epoch's."""
    from malloc_ray.study.tracking import epoch_metric_name

    records: dict[int, dict] = {}
    for key in EPOCH_KEYS:
        logged = (client.get_metric_history(run_id, epoch_metric_name(key))
                  or client.get_metric_history(run_id, key))
        for m in sorted(logged, key=lambda m: m.timestamp):
            records.setdefault(m.step, {"epoch": m.step}).setdefault(key, m.value)
    return [records[step] for step in sorted(records) if "train_loss" in records[step]]
