"""The Ray Tune function trainable: one cell = one `run_trial`, recorded as data whatever happens.

Failures never crash the study: a diverging model comes back from the training loop as
`diverged`/`no_learning`; here CUDA OOM becomes `oom` and any other exception `error`. Every
outcome is written to `<study>/trials/<trial_id>.json` (atomically: a finished cell is exactly
the cells with that file, which is what resume relies on), to the MLflow child run, and to Tune.

The result file comes first and names the child run; the run is finished after it. A crash in
between leaves a RUNNING run that the driver's reconcile finishes from the file
(`tracking.reconcile_children`); a re-run cell (`--retry-failed`) keeps its old run until the
new result replaces it, then deletes it.
"""

from __future__ import annotations

import json
import os
import resource
import time
import traceback
from pathlib import Path

from malloc_ray.config import TrialConfig
from malloc_ray.study.provenance import fmt_label_stream_auc
from malloc_ray.study.tracking import ChildRun, StudyRun, run_name


def result_path(study_dir: str | Path, trial_id: str) -> Path:
    return Path(study_dir) / "trials" / f"{trial_id}.json"


def checkpoint_path(study_dir: str | Path, trial_id: str) -> Path:
    return Path(study_dir) / "checkpoints" / f"{trial_id}.pt"


def read_result(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, path)


def reset_peak_memory(device: str) -> None:
    """Start this cell's peak-memory count: a reused Tune worker has run other cells before.
    Linux resets the process's resident high-water mark (VmHWM) on "5" to clear_refs."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux (or not allowed): the count is the process's since it started


def _peak_memory_bytes(device: str) -> int:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    try:  # the high-water mark since reset_peak_memory
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _failure(status: str, exc: BaseException, cell: dict) -> dict:
    # the epoch that failed (train.trial.fit_blaming_epoch); None: not in a training epoch
    return {"status": status, "failed_epoch": getattr(exc, "failed_epoch", None),
            "reason": repr(exc)[:2000],
            "traceback": traceback.format_exc()[-4000:], "auc": 0.5, "gauc": 0.5,
            "logloss": None, "best_epoch": None}


def run_cell(cell: dict, study: StudyRun, study_dir: str, samples: dict | None = None,
             report=None) -> dict:
    """Run one cell outside or inside Tune; `report(metrics)` forwards per-epoch progress."""
    import torch

    from malloc_ray.train.trial import run_trial

    cfg = TrialConfig.from_dict(cell["config"])
    tags = {"method": cfg.method, "category": cell["category"], "workflow": cell["workflow"],
            "depth": cfg.depth, "seed": cfg.seed, "dataset_id": cell["dataset_id"],
            "config_hash": cell["trial_id"], "status": "running", "dataset": cell["dataset"]}
    # The dataset's label-stream audit travels with its id, so a leaky dataset shows on the run.
    audit = {"label_stream_auc": fmt_label_stream_auc(cell.get("label_stream_auc"))}
    previous = read_result(result_path(study_dir, cell["trial_id"]))  # a re-run failed cell
    child = ChildRun(study, name=run_name(cfg.method, cfg.depth, cfg.seed), tags=tags,
                     config=cfg.to_dict(), params=audit,
                     keep=(previous or {}).get("mlflow_run_id"),
                     dataset=(cell["dataset"], cfg.dataset), study_dir=study_dir)
    if cfg.device == "cuda" and cell.get("gpu_fraction"):
        torch.cuda.set_per_process_memory_fraction(min(1.0, cell["gpu_fraction"]))

    def on_epoch(record: dict) -> None:
        child.log_epoch(record)
        if report:
            report({**record, "status": "running"})

    reset_peak_memory(cfg.device)
    start = time.time()
    try:
        result = run_trial(cfg, on_epoch=on_epoch, samples=samples,
                           save_checkpoint=cell.get("save_checkpoint"),
                           native_checkpoint=cell.get("native_checkpoint"))
    except torch.cuda.OutOfMemoryError as exc:
        result = _failure("oom", exc, cell)
    except Exception as exc:  # noqa: BLE001 - any other failure is a result, not a crash
        result = _failure("error", exc, cell)
    result.update({"trial_id": cell["trial_id"], "dataset": cell["dataset"],
                   "dataset_id": cell["dataset_id"], "method": cfg.method,
                   "category": cell["category"], "workflow": cell["workflow"],
                   "depth": cfg.depth, "seed": cfg.seed, "config": cfg.to_dict(),
                   "mlflow_run_id": child.run_id, "started_at": start, "finished_at": time.time(),
                   "peak_memory_bytes": _peak_memory_bytes(cfg.device),
                   "estimated_memory_bytes": cell.get("estimated_memory_bytes"),
                   "gpu_fraction": cell.get("gpu_fraction", 0.0)})
    write_result(result_path(study_dir, cell["trial_id"]), result)  # the cell is finished
    child.finish(result)
    child.drop_others()  # the run of the result this one replaced
    return result


def reconcile_study(study: StudyRun, study_dir: str | Path, say=print) -> dict:
    """Make the study's MLflow child runs agree with its result files (one per finished cell;
    `tracking.reconcile_children`). The driver calls it while no trial runs."""
    from malloc_ray.study.results import finished_results
    from malloc_ray.study.tracking import reconcile_children

    counts = reconcile_children(
        study, finished_results(study_dir),
        write_result=lambda trial_id, result: write_result(result_path(study_dir, trial_id),
                                                           result))
    if any(counts.values()):
        say("MLflow child runs reconciled with the result files: "
            + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    return counts


def tune_trainable(config: dict, study: StudyRun = None, study_dir: str = None,
                   samples: dict | None = None) -> None:
    """`tune.with_parameters(tune_trainable, study=..., study_dir=..., samples=...)`."""
    from ray import tune

    cell = config["cell"]
    result = run_cell(cell, study, study_dir, (samples or {}).get(cell["dataset"]),
                      report=tune.report)
    # Tune's progress output shows these; the full result is in the result file and MLflow.
    keys = ("status", "auc", "gauc", "logloss", "kv_bytes_per_user", "kv_payload_bytes_per_user",
            "macs_per_request", "best_epoch", "train_seconds")
    tune.report({**{k: result.get(k) for k in keys}, "done": True})
