"""Wall time of a study run by the study service (Ray Tune) vs the same trials in a plain loop.

    python benchmarks/tune_overhead.py [--short-trials 6] [--long-trials 2] [--long-seconds 60]
    python benchmarks/tune_overhead.py --smoke-test

Both sides run the same cells through the same function (`run_cell`: train, evaluate, write
the result file and the MLflow child run) on one prepared synthetic dataset:
  - plain loop: the MLflow parent run, then `run_cell` for each cell, one after another;
  - study service: `run_study` on the same spec (Ray start-up, Tune, one worker process per
    trial, the trials table), then Ray is shut down so the next run pays start-up again.
Each trial gets every CPU (`cpus_per_trial` = CPU count), so Tune runs one trial at a time
with as many threads as the loop: the ratio is overhead, not parallelism. Trials use the local
loader on both sides. A warm-up loop trial first pays this process's one-time imports and the
creation of the MLflow store that every study here shares (one sqlite file), which would
otherwise be charged to whichever side runs first. Long trials are sized from a
calibration trial to about --long-seconds. Ratios come from one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

# Trials sized for their cost, not to learn: the no-learning judgement is off, so a trial
# that ran to the end is `ok`.
SHORT = {"d_model": 16, "num_heads": 2, "max_len": 16, "batch_size": 32, "epochs": 1,
         "max_steps_per_epoch": 3, "loader": "local", "no_learning_margin": None}
LONG = {"d_model": 64, "num_heads": 4, "max_len": 64, "batch_size": 64, "epochs": 1,
        "max_steps_per_epoch": 20, "loader": "local", "no_learning_margin": None}


def make_spec(name: str, work: Path, dataset: Path, trial: dict, n: int):
    """n native cells that differ only in their seed: n distinct trials of equal cost."""
    from malloc_ray.study.spec import parse_spec

    return parse_spec({
        "name": name, "output_dir": str(work / "runs"),
        "datasets": {"syn": {"path": str(dataset)}}, "methods": ["native"], "depths": [1],
        "seeds": list(range(n)), "trial": trial,
        "resources": {"cpus_per_trial": os.cpu_count() or 1},
        "mlflow": {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}"}})


def plain_loop(spec) -> tuple[float, list[dict]]:
    """Seconds for the MLflow parent run plus every cell run in this process."""
    from malloc_ray.study.run import cell_records
    from malloc_ray.study.spec import expand_cells
    from malloc_ray.study.tracking import finish_study_run, start_study_run
    from malloc_ray.study.trainable import run_cell

    spec.study_dir.mkdir(parents=True, exist_ok=True)
    records = cell_records(spec, expand_cells(spec, {"syn": spec.datasets[0].path}), None)
    start = time.perf_counter()
    study = start_study_run(spec.mlflow_tracking_uri, spec.name, spec.study_dir)
    results = [run_cell(r, study, str(spec.study_dir)) for r in records]
    finish_study_run(study)
    return time.perf_counter() - start, results


def study_service(spec) -> tuple[float, float, list[dict]]:
    """Seconds for `run_study` (Ray started inside it), the seconds its trials spent in
    `run_trial` (from their result files), and those results."""
    import ray

    from malloc_ray.study.run import run_study

    start = time.perf_counter()
    table = run_study(spec)
    seconds = time.perf_counter() - start
    ray.shutdown()
    results = [json.loads(p.read_text()) for p in (spec.study_dir / "trials").glob("*.json")]
    inside = sum(r["finished_at"] - r["started_at"] for r in results)
    assert len(table) == len(results)
    return seconds, inside, results


METRICS = ("auc", "gauc", "logloss", "valid_auc")


def same_metrics(loop: list[dict], tune: list[dict]) -> bool:
    """Per cell (by seed: the cells differ in nothing else), the same test/valid metrics on
    both sides: a reused Tune worker must train exactly as a fresh process does."""
    def by_seed(results):
        return {r["seed"]: tuple(r[m] for m in METRICS) for r in results}

    return by_seed(loop) == by_seed(tune)


def long_trial(work: Path, dataset: Path, seconds: float) -> dict:
    """LONG with as many epochs as fit in about `seconds`, from a one-epoch calibration trial
    (its fixed part: data, evaluation, costs; its epoch: training steps plus validation)."""
    wall, results = plain_loop(make_spec("calibrate", work, dataset, LONG, 1))
    epoch = results[0]["history"][0]["seconds"]
    fixed = max(wall - epoch, 0.0)
    epochs = max(1, round((seconds - fixed) / epoch))
    print(f"calibration: one epoch {epoch:.1f}s, fixed part {fixed:.1f}s -> {epochs} epochs",
          flush=True)
    return {**LONG, "epochs": epochs, "patience": epochs}  # no early stop: equal-length trials


def compare(label: str, work: Path, dataset: Path, trial: dict, n: int) -> str:
    loop_s, results = plain_loop(make_spec(f"{label}-loop", work, dataset, trial, n))
    tune_s, inside_s, tuned = study_service(make_spec(f"{label}-tune", work, dataset, trial, n))
    statuses = [r["status"] for r in tuned]
    bad = [r["status"] for r in results if r["status"] != "ok"] + \
          [s for s in statuses if s != "ok"]
    if bad or len(statuses) != n:
        raise SystemExit(f"{label}: trials did not all finish ok: {bad or statuses}")
    if not same_metrics(results, tuned):
        raise SystemExit(f"{label}: the study's metrics differ from the plain loop's")
    # Each side's wall time over the time its own trials spent training and evaluating
    # (run_trial, from the result files): a change in background load between the two runs
    # cannot skew these, as it can the first ratio.
    loop_inside = sum(r["finished_at"] - r["started_at"] for r in results)
    line = (f"{label:5s} trials: {n} x {loop_s / n:5.1f} s | plain loop {loop_s:7.1f} s | "
            f"Ray Tune study {tune_s:7.1f} s | ratio {tune_s / loop_s:5.2f}x | overhead "
            f"{(tune_s - loop_s) / n:5.1f} s per trial | wall / run_trial time: loop "
            f"{loop_s / loop_inside:5.2f}x, Tune {tune_s / inside_s:5.2f}x | metrics per cell "
            f"equal: yes")
    print(line, flush=True)
    return line


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--short-trials", type=int, default=6)
    p.add_argument("--long-trials", type=int, default=2)
    p.add_argument("--long-seconds", type=float, default=60.0,
                   help="target length of one long trial")
    p.add_argument("--work-dir", help="where data and runs go (default: a temporary dir)")
    p.add_argument("--smoke-test", action="store_true",
                   help="one short trial on a small dataset, no warm-up, no long trials")
    args = p.parse_args(argv)
    users = 300
    if args.smoke_test:
        args.short_trials, args.long_trials, users = 1, 0, 60
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the specs name their store
    import torch

    from malloc_ray.data.prepare import prepare

    with tempfile.TemporaryDirectory(prefix="tune-overhead-") as tmp:
        work = Path(args.work_dir or tmp).resolve()
        dataset = work / "data"
        if not dataset.exists():
            prepare("synthetic", dataset, profile="kuaivideo", users=users, max_len=64, seed=0)
        if not args.smoke_test:
            plain_loop(make_spec("warm-up", work, dataset, SHORT, 1))
        lines = [compare("short", work, dataset, SHORT, args.short_trials)]
        if args.long_trials:
            lines.append(compare("long", work, dataset,
                                 long_trial(work, dataset, args.long_seconds), args.long_trials))
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), cpus_per_trial={os.cpu_count()}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
