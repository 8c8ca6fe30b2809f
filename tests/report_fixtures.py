"""A trials table shaped like a real study's (through `results.build_table`), with failures,
for testing the analysis and the report without training anything."""

from __future__ import annotations

import numpy as np

from malloc_ray.methods import REGISTRY
from malloc_ray.study.provenance import PROTOCOL
from malloc_ray.study.provenance import write as write_provenance
from malloc_ray.study.results import build_table, write_table

# (method, depth, seed) -> status for the planted failures
FAILURES = {("mqa", 4, 1): "diverged", ("kivi", 4, 0): "error", ("kivi", 4, 1): "oom",
            ("gqa", 1, 0): "no_learning"}


def fake_results(methods=("native", "wo_mem", "mqa", "gqa", "kivi"), depths=(1, 4),
                 seeds=(0, 1), datasets=("kuai", "amazon"), epochs=3, seed=0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for ds in datasets:
        for m in methods:
            for depth in depths:
                for s in seeds:
                    status = FAILURES.get((m, depth, s), "ok")
                    cls = REGISTRY[m]
                    history = [{"epoch": e, "train_loss": 0.7 - 0.05 * e + rng.normal(0, 0.01),
                                "valid_auc": 0.6 + 0.02 * e + rng.normal(0, 0.005),
                                "valid_gauc": 0.58 + 0.02 * e, "valid_logloss": 0.68 - 0.01 * e,
                                "seconds": 1.0} for e in range(epochs)]
                    failed = status != "ok"
                    payload = 0 if cls.recompute else int(1000 * depth * rng.integers(1, 9))
                    metadata = 0 if cls.recompute else int(100 * depth * rng.integers(1, 9))
                    out.append({
                        "trial_id": f"{ds}-{m}-{depth}-{s}", "dataset": ds,
                        "dataset_id": f"id-{ds}", "method": m, "category": cls.category,
                        "workflow": cls.workflow, "depth": depth, "seed": s, "status": status,
                        "failed_epoch": 1 if failed else None,
                        "reason": f"planted {status}" if failed else None,
                        "auc": 0.5 if failed else float(rng.uniform(0.6, 0.7)),
                        "gauc": 0.5 if failed else float(rng.uniform(0.58, 0.68)),
                        "logloss": None if failed else float(rng.uniform(0.6, 0.7)),
                        "best_epoch": None if failed else int(rng.integers(0, epochs)),
                        "epochs_run": 1 if failed else epochs,
                        "kv_bytes_per_user": payload + metadata,
                        "kv_payload_bytes_per_user": payload,
                        "macs_per_request": int(1e6 * depth * (40 if cls.recompute else 2)),
                        "peak_memory_bytes": int(5e8), "train_seconds": 2.0,
                        "samples_per_second": 1000.0, "mlflow_run_id": f"run{len(out)}",
                        "history": history[:1] if failed else history})
    return out


# The first dataset carries the label-stream audit, the second was prepared before it existed.
LABEL_STREAM_AUC = {"kuai": 0.6512}


def fake_provenance(datasets) -> dict:
    """study.json as a study writes it, reduced to what the report reads."""
    stats = {"users": 300, "items": 90, "interactions": 9000, "max_length": 64,
             "avg_length": 30.0, "positive_rate": 0.28}
    return {"name": "fake", "protocol": PROTOCOL, "datasets": {
        ds: {"dir": f"/data/{ds}", "dataset_id": f"id-{ds}",
             "stats": {**stats, **({"label_stream_auc": LABEL_STREAM_AUC[ds]}
                                   if ds in LABEL_STREAM_AUC else {})}}
        for ds in datasets}}


def write_fake_study(study_dir, provenance: bool = False, **kwargs):
    study_dir.mkdir(parents=True, exist_ok=True)
    table = build_table(fake_results(**kwargs))
    write_table(table, study_dir)
    if provenance:
        write_provenance(study_dir, fake_provenance(sorted(table["dataset"].unique())))
    return table
