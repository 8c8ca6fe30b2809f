"""What a reader needs to reproduce a study, written once per run as `<study>/study.json`.

Code (git commit, dirty flag, pyproject hash), software versions, hardware and Ray cluster shape,
datasets (id = content hash, statistics, split), the evaluation protocol, seeds, the MLflow
location and the exact command. The report prints it as its reproducibility block.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from malloc_ray.data.audit import WARN_ABOVE as LABEL_STREAM_LEAK

PACKAGES = ("malloc-ray", "torch", "ray", "mlflow", "optuna", "numpy", "pandas", "pyarrow",
            "matplotlib", "torchmetrics")
REPO = Path(__file__).resolve().parents[2]

PROTOCOL = {
    "split": "per user, chronological: the last 10% of each user's interactions (at least one) "
             "are test targets, the 10% before them valid targets, the rest train",
    "target": "each sample scores one target interaction given the user's history before it "
              "(max_len interactions per window, target included)",
    "metrics": "AUC and Logloss over all test targets; GAUC = per-user AUC weighted by the "
               "user's target count, users whose targets are all one class skipped",
    "model_selection": "the epoch with the best valid AUC (early stopping with patience); test "
                       "metrics at that epoch",
    "post_hoc": "post-hoc methods score the Native weights of the same (dataset, depth, seed)",
    "aggregation": "mean and population std over seeds whose status is ok; failed seeds are "
                   "counted, never averaged",
}


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_info() -> dict:
    pyproject = REPO / "pyproject.toml"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": None if status is None else bool(status),
            "pyproject_sha256": hashlib.sha256(pyproject.read_bytes()).hexdigest()
            if pyproject.exists() else None}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict:
    info = {"platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count()}
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                   / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    else:
        info["gpu"] = None
    return info


def ray_cluster() -> dict | None:
    try:
        import ray

        if not ray.is_initialized():
            return None
        return {"nodes": sum(1 for n in ray.nodes() if n.get("Alive")),
                "resources": {k: v for k, v in ray.cluster_resources().items()
                              if k in ("CPU", "GPU", "memory")}}
    except Exception:  # noqa: BLE001 - provenance must never stop a study
        return None


# The dataset's label-stream audit (`stats.label_stream_auc`, written by data.prepare): how well
# the label stream alone predicts the target. Datasets prepared before the audit lack it. The
# threshold, LABEL_STREAM_LEAK, is the one prepare warns above.
LABEL_STREAM_NOTE = ("Label-stream AUC: AUC on the valid split of a predictor that sees only the "
                     f"previous labels and position parity; above {LABEL_STREAM_LEAK:.2f} the "
                     "label stream leaks the target. n/a: prepared before this audit existed.")


def label_stream_auc(stats: dict | None) -> float | None:
    """`stats.label_stream_auc` of a dataset's meta.json, None where it is absent."""
    value = (stats or {}).get("label_stream_auc")
    return None if value is None else float(value)


def fmt_label_stream_auc(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def relative_to_study(path: str | Path, study_dir: str | Path | None) -> str:
    """`path` relative to the study dir when it is inside it (a study is relocatable), else
    as it is (a dataset prepared elsewhere)."""
    if study_dir is None:
        return str(path)
    try:
        return Path(path).resolve().relative_to(Path(study_dir).resolve()).as_posix()
    except ValueError:
        return str(path)


def dataset_info(dirs: dict[str, str], study_dir: str | Path | None = None) -> dict:
    from malloc_ray.data.prepare import read_meta

    out = {}
    for name, directory in dirs.items():
        meta = read_meta(directory)
        out[name] = {"dir": relative_to_study(directory, study_dir),
                     "dataset_id": meta.get("dataset_id"),
                     "stats": meta.get("stats"), "source": meta.get("source")}
    return out


def collect(spec, dirs: dict[str, str], tracking_uri: str, study_run=None,
            smoke_test: bool = False) -> dict:
    """Paths inside the study directory are recorded relative to it (docs/study.md, "Moving a
    study"): the MLflow store as `mlflow.store`, prepared datasets as `datasets.*.dir`."""
    from malloc_ray.study.tracking import recorded_mlflow

    return {
        "name": spec.name,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "smoke_test": smoke_test,
        "code": code_info(),
        "versions": versions(),
        "hardware": hardware(),
        "ray_cluster": ray_cluster(),
        "datasets": dataset_info(dirs, spec.study_dir),
        "seeds": list(spec.seeds),
        "protocol": PROTOCOL,
        # how targets are scored (data/streams.py); a spec's overrides may change it per cell
        "eval_protocol": spec.trial.get("eval_protocol", "window"),
        "mlflow": {**recorded_mlflow(tracking_uri, spec.study_dir), "experiment": spec.name,
                   "experiment_id": getattr(study_run, "experiment_id", None),
                   "parent_run_id": getattr(study_run, "parent_run_id", None)},
        "spec": json.loads(json.dumps(asdict(spec), default=str)),
    }


def write(study_dir: str | Path, info: dict) -> Path:
    path = Path(study_dir) / "study.json"
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(info, indent=2, default=str))
    os.replace(tmp, path)
    return path


def read(study_dir: str | Path) -> dict | None:
    path = Path(study_dir) / "study.json"
    return json.loads(path.read_text()) if path.exists() else None
