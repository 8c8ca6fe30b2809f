"""The study driver: datasets once, cells from the spec, Ray Tune over the unfinished ones.

    spec -> prepare datasets -> cells (trial id = config hash) -> skip finished cells
         -> phase 1: trained methods (Native saves its weights)
         -> phase 2: post-hoc methods on the Native weights of the same (dataset, depth, seed)
         -> baselines: the spec's `baselines`, once per dataset, in the driver (no Tune trial)
         -> trials.parquet

Resume is the same call: a cell is finished when its result file exists, so a re-run (or
`malloc-ray study resume`) launches only the cells that never finished; interrupted ones
restart from scratch and replace their unfinished MLflow child run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from malloc_ray import smoke
from malloc_ray.config import TrialConfig, baseline_hash, config_hash
from malloc_ray.data.prepare import prepare, read_meta
from malloc_ray.methods import get_method
from malloc_ray.study import provenance
from malloc_ray.study import results as results_mod
from malloc_ray.study.pareto import BASELINE  # a baseline row's category and workflow
from malloc_ray.study.resources import estimate_peak_bytes, trial_resources
from malloc_ray.study.spec import (DISTRIBUTIONS, Cell, StudySpec, check_files, dataset_dir,
                                   expand_cells, smoke_spec)
from malloc_ray.study.trainable import checkpoint_path, reconcile_study
from malloc_ray.study.storage import check_cluster_storage, tune_storage_path
from malloc_ray.study.tracking import (ChildRun, check_study_store, finish_study_run,
                                       resolve_tracking_uri, run_name, start_study_run)



def log(msg: str) -> None:
    print(f"[malloc-ray] {msg}", flush=True)


# -- datasets -----------------------------------------------------------------------------
def prepare_datasets(spec: StudySpec, smoke_test: bool) -> dict[str, str]:
    """Dataset key -> prepared directory; recipes are prepared once and reused after."""
    dirs = {}
    for ds in spec.datasets:
        out = dataset_dir(spec, ds)  # a prepared dir was checked by check_files
        if ds.path:
            dirs[ds.name] = str(out)
            continue
        recipe = smoke.synthetic_recipe(ds.prepare) if smoke_test else dict(ds.prepare)
        stamp = out.parent / f"{ds.name}.recipe.json"
        if out.exists() and stamp.exists() and json.loads(stamp.read_text()) == recipe:
            log(f"dataset {ds.name}: reusing {out}")
        else:
            log(f"dataset {ds.name}: preparing {recipe}")
            source = recipe.pop("source")  # the spec's check made sure there is one
            prepare(source, out, overwrite=True, progress=lambda m: log(f"  {m}"), **recipe)
            stamp.write_text(json.dumps({"source": source, **recipe}))
        dirs[ds.name] = str(out.resolve())
    return dirs


# -- cells ------------------------------------------------------------------------------------
def native_twin(cfg: TrialConfig) -> TrialConfig:
    """The Native cell a post-hoc method borrows its weights from."""
    raw = cfg.to_dict()
    raw.update(method="native", hparams={}, fault=None)
    return TrialConfig.from_dict(raw)


def cell_records(spec: StudySpec, cells: list[Cell], device_bytes: int | None) -> list[dict]:
    """Plain dicts that travel to trials: config, ids, resources, checkpoint paths."""
    metas = {c.config.dataset: read_meta(c.config.dataset) for c in cells}
    by_id, twins = {}, []
    for cell in cells:
        if get_method(cell.config.method).workflow == "post-hoc":
            twins.append(Cell(cell.dataset, native_twin(cell.config)))
    for cell in twins + cells:  # twins first; a spec that lists native anyway dedups here
        cfg, meta = cell.config, metas[cell.config.dataset]
        trial_id = config_hash(cfg, meta["dataset_id"])
        method = get_method(cfg.method)
        estimate = estimate_peak_bytes(cfg, meta["vocab_size"])
        res = trial_resources(cfg, meta["vocab_size"], spec.resources.cpus_per_trial,
                              spec.resources.gpus, device_bytes, spec.resources.gpu_fraction_step)
        record = {"trial_id": trial_id, "config": cfg.to_dict(), "dataset": cell.dataset,
                  "dataset_id": meta["dataset_id"],
                  "label_stream_auc": provenance.label_stream_auc(meta["stats"]),
                  "category": method.category, "workflow": method.workflow,
                  "resources": res, "gpu_fraction": res["gpu"],
                  "estimated_memory_bytes": estimate,
                  "name": f"{cell.dataset}-{cfg.method}-d{cfg.depth}-s{cfg.seed}-{trial_id[:6]}"}
        if cfg.method == "native":
            record["save_checkpoint"] = str(checkpoint_path(spec.study_dir, trial_id))
        if method.workflow == "post-hoc":
            twin = config_hash(native_twin(cfg), meta["dataset_id"])
            record["native_checkpoint"] = str(checkpoint_path(spec.study_dir, twin))
        by_id.setdefault(trial_id, record)
    return list(by_id.values())


# -- Ray ---------------------------------------------------------------------------------------
def init_ray() -> None:
    import ray

    from malloc_ray.ray_local import ensure_ray

    if ray.is_initialized():
        return
    # RAY_ADDRESS (inside `ray job submit`): a plain ray.init(), never num_cpus; else a local
    # Ray that listens on 127.0.0.1 only (malloc_ray/ray_local.py).
    ensure_ray(log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


def cuda_device_bytes() -> int | None:
    """Memory of one GPU: the driver's own, else one cluster worker's (a head node without a
    GPU, as in clusters/), else None."""
    import ray
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    if not ray.cluster_resources().get("GPU"):
        return None

    @ray.remote(num_gpus=1)
    def probe() -> int:
        return torch.cuda.get_device_properties(0).total_memory

    return ray.get(probe.remote())


def samples_key(dataset: str, cfg: dict) -> str:
    """Which materialized sample rows a trial config reads (see `materialize_samples`)."""
    return f"{dataset}|{cfg['max_len']}|{cfg['loss_positions']}"


def materialize_samples(records: list[dict]) -> dict:
    """Ray Data sample rows per (dataset, max_len, loss_positions), materialized once in the
    driver and handed to trials: reading inside trials can deadlock when trials hold every CPU."""
    from malloc_ray.data import loader

    out: dict = {}
    for rec in records:
        cfg = rec["config"]
        if cfg["loader"] != "ray":
            continue
        key = samples_key(rec["dataset"], cfg)
        if key in out:
            continue
        ds = loader.load_dataset(cfg["dataset"])
        out[key] = {split: loader.ray_samples(ds, split, cfg["max_len"],
                                              cfg["loss_positions"]).materialize()
                    for split in ("train", "valid", "test")}  # selected rows, per split
    return out


class _Progress:
    """Tune callback: one line per finished cell with the study's ETA."""

    def __init__(self, total: int):
        from ray.tune import Callback

        class Cb(Callback):
            def on_trial_complete(cb_self, iteration, trials, trial, **info):
                self.done += 1
                elapsed = time.time() - self.start
                eta = elapsed / self.done * (self.total - self.done)
                status = (trial.last_result or {}).get("status", "?")
                log(f"{self.done}/{self.total} cells done ({trial.config['cell_name']}: "
                    f"{status}); elapsed {elapsed:.0f}s, ETA {eta:.0f}s")

        self.total, self.done, self.start, self.callback = total, 0, time.time(), Cb()


def run_phase(name: str, spec: StudySpec, records: list[dict], study, samples) -> None:
    from ray import tune

    from malloc_ray.study.trainable import tune_trainable

    if not records:
        return
    log(f"{name}: {len(records)} cells")
    by_name = {r["name"]: r for r in records}
    # Resolved here, in the driver: Tune runs each trial in its own working directory.
    study_dir = str(spec.study_dir)

    def trainable(config):
        rec = by_name[config["cell_name"]]
        key = samples_key(rec["dataset"], rec["config"])
        tune_trainable({"cell": rec}, study=study, study_dir=study_dir,
                       samples={rec["dataset"]: samples.get(key)})

    resources = tune.with_resources(trainable,
                                    lambda config: by_name[config["cell_name"]]["resources"])
    progress = _Progress(len(records))
    tuner = tune.Tuner(
        resources,
        param_space={"cell_name": tune.grid_search(sorted(by_name))},
        tune_config=tune.TuneConfig(max_concurrent_trials=spec.resources.max_concurrent_trials,
                                    trial_name_creator=lambda t: t.config["cell_name"],
                                    trial_dirname_creator=lambda t: t.config["cell_name"]),
        run_config=tune.RunConfig(name=f"{spec.name}-{name}",
                                  storage_path=tune_storage_path(spec),
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[progress.callback], verbose=1),
    )
    tuner.fit()


# -- baselines ---------------------------------------------------------------------------------
NAN = float("nan")
COST_FIELDS = ("kv_bytes_per_user", "kv_payload_bytes_per_user", "macs_per_request",
               "macs_prefill", "peak_memory_bytes", "estimated_memory_bytes",
               "samples_per_second")


def baseline_records(spec: StudySpec, cells: list[Cell], smoke_test: bool = False
                     ) -> list[dict]:
    """One record per (dataset, baseline of the spec). A baseline is scored with the trial's
    history window (`max_len`) of the dataset's first cell at its smallest depth; its `depth`
    is that smallest depth (the report shows baseline rows at every depth: they have none).
    din and bst also take the trial's batch_size and d_model (as their embedding width)."""
    from malloc_ray.train.baselines import PEERS

    out = []
    for ds in spec.datasets:
        mine = [c for c in cells if c.dataset == ds.name]
        if not mine or not spec.baselines:
            continue
        cfg = min(mine, key=lambda c: (c.config.depth, c.config.seed)).config
        meta = read_meta(cfg.dataset)
        for name in spec.baselines:
            options = ({"batch_size": cfg.batch_size, "embed_dim": cfg.d_model,
                        "smoke_test": smoke_test} if name in PEERS else {})
            trial_id = baseline_hash(name, meta["dataset_id"], cfg.max_len, **options)
            out.append({"trial_id": trial_id, "dataset": ds.name,
                        "dataset_id": meta["dataset_id"],
                        "label_stream_auc": provenance.label_stream_auc(meta["stats"]),
                        "baseline": name, "depth": cfg.depth, "workflow": BASELINE,
                        "config": {"baseline": name, "dataset": cfg.dataset,
                                   "max_len": cfg.max_len, **options},
                        "name": f"{ds.name}-{name}-{trial_id[:6]}"})
    return out


def run_baseline_cell(rec: dict, study, study_dir: Path) -> dict:
    """Score one baseline on test (and valid: `valid_auc`) as `malloc-ray baseline NAME
    --split test` does, and write its result file (the cell is finished) and child run."""
    from malloc_ray.data.loader import load_dataset
    from malloc_ray.study.provenance import fmt_label_stream_auc
    from malloc_ray.study.trainable import read_result, result_path, write_result
    from malloc_ray.train.baselines import PEERS, run_baseline

    name, cfg = rec["baseline"], rec["config"]
    tags = {"method": name, "category": BASELINE, "workflow": BASELINE, "depth": rec["depth"],
            "seed": 0, "dataset_id": rec["dataset_id"], "config_hash": rec["trial_id"],
            "status": "running", "dataset": rec["dataset"]}
    previous = read_result(result_path(study_dir, rec["trial_id"]))
    child = ChildRun(study, name=run_name(name, rec["depth"], 0), tags=tags, config=cfg,
                     params={"label_stream_auc": fmt_label_stream_auc(rec["label_stream_auc"])},
                     keep=(previous or {}).get("mlflow_run_id"),
                     dataset=(rec["dataset"], cfg["dataset"]), study_dir=str(study_dir),
                     system_metrics=False)
    start = time.time()
    options = {k: v for k, v in cfg.items() if k not in ("baseline", "dataset", "max_len")}
    try:
        ds = load_dataset(cfg["dataset"])
        test = run_baseline(name, ds, "test", max_len=cfg["max_len"], seed=0, **options)
        valid_auc = (test.get("best_valid_auc") if name in PEERS else
                     run_baseline(name, ds, "valid", max_len=cfg["max_len"])["auc"])
        result = {"status": "ok", "auc": test["auc"], "gauc": test["gauc"],
                  "logloss": NAN if test.get("logloss") is None else test["logloss"],
                  "valid_auc": NAN if valid_auc is None else valid_auc, "n": test["n"],
                  "train_seconds": test.get("train_seconds", NAN)}
    except Exception as exc:  # noqa: BLE001 - a failing baseline is a row, as a trial is
        result = {"status": "error", "reason": repr(exc)[:2000], "auc": NAN, "gauc": NAN,
                  "logloss": NAN}
    result.update({"trial_id": rec["trial_id"], "dataset": rec["dataset"],
                   "dataset_id": rec["dataset_id"], "method": name, "category": BASELINE,
                   "workflow": BASELINE, "depth": rec["depth"], "seed": 0, "config": cfg,
                   "hparams": {}, "history": [], "mlflow_run_id": child.run_id,
                   "started_at": start, "finished_at": time.time(),
                   **{k: NAN for k in COST_FIELDS}, "gpu_fraction": 0.0})
    write_result(result_path(study_dir, rec["trial_id"]), result)  # the cell is finished
    child.finish(result)
    child.drop_others()
    return result


def run_baselines(records: list[dict], study, study_dir: Path) -> None:
    if records:
        log(f"baselines: {len(records)} cells, in the driver")
    for rec in records:
        result = run_baseline_cell(rec, study, study_dir)
        log(f"baseline {rec['name']}: {result['status']}, test AUC {result['auc']:.4f}")


# -- Optuna search ----------------------------------------------------------------------------
def search_space(spec: StudySpec, methods: list[str]) -> dict:
    """Tune search space: method and depth as choices, plus the spec's `search.space`
    ({trial key: {distribution: args}}, e.g. {lr: {loguniform: [1e-4, 1e-2]}}; one of
    DISTRIBUTIONS, checked with the spec)."""
    from ray import tune

    space = {"method": tune.choice(methods), "depth": tune.choice(spec.depths)}
    for key, dist in spec.search.space.items():
        (name, args), = dist.items()
        space[key] = getattr(tune, name)(args) if name == "choice" else getattr(tune, name)(*args)
    return space


def run_optuna(spec: StudySpec, dirs: dict[str, str], study, smoke_test: bool) -> None:
    """One Optuna search per dataset over the trained methods; single objective with TPE, or
    several (e.g. auc and kv_bytes_per_user, payload + metadata) with NSGA-II. The Optuna
    study is stored in <study>/optuna.db beside MLflow. Post-hoc methods are not searched
    (they need a Native model of the same cell); run them in a grid study."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from malloc_ray.study.spec import OBJECTIVES
    from malloc_ray.study.trainable import run_cell

    methods = [m for m in spec.methods if get_method(m).workflow == "trained"]
    objectives = spec.search.objectives
    modes = [OBJECTIVES[o] for o in objectives]
    storage = optuna.storages.RDBStorage(f"sqlite:///{spec.study_dir / 'optuna.db'}")
    for ds in spec.datasets:
        meta = read_meta(dirs[ds.name])
        done = [r for r in results_mod.finished_results(spec.study_dir).values()
                if r["dataset"] == ds.name]
        budget = (smoke.SEARCH_SAMPLES if smoke_test else spec.search.num_samples) - len(done)
        log(f"optuna on {ds.name}: {len(done)} trials finished, {max(budget, 0)} to run")
        if budget <= 0:
            continue

        base = {**spec.trial, "dataset": dirs[ds.name], "seed": spec.seeds[0], "method": "native",
                "depth": spec.depths[0]}
        if smoke_test:
            base.update(smoke.trial_overrides(base))
        base_cfg = TrialConfig.from_dict(base).to_dict()
        samples = materialize_samples([{"dataset": ds.name, "config": base_cfg}])

        def trainable(config, ds_name=ds.name, ds_dir=dirs[ds.name], meta=meta, samples=None,
                      study_dir=str(spec.study_dir)):
            raw = {**spec.trial, **config, "dataset": ds_dir, "seed": spec.seeds[0],
                   "hparams": dict(spec.hparams.get(config["method"], {}))}
            if smoke_test:
                raw.update(smoke.trial_overrides(raw))
            cfg = TrialConfig.from_dict(raw)
            if cfg.loader == "ray" and samples_key(ds_name, cfg.to_dict()) not in (samples or {}):
                raw["loader"] = "local"  # no driver-made rows for this selection: no Ray tasks
                cfg = TrialConfig.from_dict(raw)
            method = get_method(cfg.method)
            trial_id = config_hash(cfg, meta["dataset_id"])
            record = {"trial_id": trial_id, "config": cfg.to_dict(), "dataset": ds_name,
                      "dataset_id": meta["dataset_id"],
                      "label_stream_auc": provenance.label_stream_auc(meta["stats"]),
                      "category": method.category, "workflow": method.workflow,
                      "gpu_fraction": 0.0,
                      "estimated_memory_bytes": estimate_peak_bytes(cfg, meta["vocab_size"]),
                      "name": f"{ds_name}-{cfg.method}-d{cfg.depth}-{trial_id[:6]}"}
            result = run_cell(record, study, study_dir,
                              (samples or {}).get(samples_key(ds_name, record["config"])))
            tune.report({o: result.get(o) if result.get(o) is not None else float("nan")
                         for o in objectives} | {"status": result["status"]})

        sampler = (optuna.samplers.NSGAIISampler(seed=spec.search.seed) if len(objectives) > 1
                   else optuna.samplers.TPESampler(seed=spec.search.seed))
        search = OptunaSearch(metric=objectives if len(objectives) > 1 else objectives[0],
                              mode=modes if len(objectives) > 1 else modes[0], sampler=sampler,
                              storage=storage, study_name=f"{spec.name}-{ds.name}",
                              seed=spec.search.seed)
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(trainable, samples=samples),
                                {"cpu": spec.resources.cpus_per_trial}),
            param_space=search_space(spec, methods),
            tune_config=tune.TuneConfig(search_alg=search, num_samples=budget,
                                        max_concurrent_trials=spec.resources.max_concurrent_trials),
            run_config=tune.RunConfig(name=f"{spec.name}-{ds.name}-optuna",
                                      storage_path=tune_storage_path(spec),
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      verbose=1))
        tuner.fit()


# -- the study ---------------------------------------------------------------------------------
def study_params(spec: StudySpec, dirs: dict[str, str]) -> dict:
    """The parent run's parameters: the resolved spec, and per dataset its id and label-stream
    audit (the same values every child run of that dataset carries)."""
    params = {"spec": json.dumps(asdict(spec), default=str)}
    for name, directory in dirs.items():
        meta = read_meta(directory)
        params[f"dataset_id.{name}"] = meta["dataset_id"]
        params[f"label_stream_auc.{name}"] = provenance.fmt_label_stream_auc(
            provenance.label_stream_auc(meta["stats"]))
    return params


def run_study(spec: StudySpec, smoke_test: bool = False, retry_failed: bool = False
              ) -> pd.DataFrame:
    if smoke_test:
        spec = smoke_spec(spec)  # the spec's own smoke section, if it has one
    # Absolute from here on: trials run in Tune's per-trial working directories.
    spec.output_dir = str(Path(spec.output_dir).expanduser().resolve())
    check_files(spec)  # bad input stops here, before Ray starts or anything is written
    study_dir = spec.study_dir
    tracking_uri = resolve_tracking_uri(spec.mlflow_tracking_uri, study_dir)
    check_study_store(tracking_uri, study_dir)  # a study with results never gets an empty store
    init_ray()  # first: a multi-node cluster without shared storage stops before any work
    check_cluster_storage(spec, tracking_uri)
    study_dir.mkdir(parents=True, exist_ok=True)
    dirs = prepare_datasets(spec, smoke_test)
    if spec.search.mode == "optuna":
        return run_search_study(spec, dirs, tracking_uri, smoke_test)
    cells = expand_cells(spec, dirs, smoke_test)
    init_ray()
    records = cell_records(spec, cells, cuda_device_bytes())
    baselines = baseline_records(spec, cells, smoke_test)
    finished = results_mod.finished_results(study_dir)
    if retry_failed:
        finished = {k: v for k, v in finished.items() if v["status"] == "ok"}
    todo = [r for r in records if r["trial_id"] not in finished]
    baselines_todo = [r for r in baselines if r["trial_id"] not in finished]
    records = records + baselines  # the trials table's rows, in this order
    left = len(todo) + len(baselines_todo)
    log(f"study {spec.name}: {len(records)} cells, {len(records) - left} already finished, "
        f"{left} to run; MLflow: {tracking_uri}")
    study = start_study_run(tracking_uri, spec.name, study_dir, params=study_params(spec, dirs),
                            datasets=dirs)
    provenance.write(study_dir, provenance.collect(spec, dirs, tracking_uri, study, smoke_test))
    reconcile_study(study, study_dir, log)  # what a killed driver left: one child run per cell
    status = "FAILED"
    try:
        samples = materialize_samples(todo)
        run_phase("trained", spec, [r for r in todo if r["workflow"] == "trained"], study, samples)
        run_phase("post-hoc", spec, [r for r in todo if r["workflow"] == "post-hoc"], study,
                  samples)
        run_baselines(baselines_todo, study, study_dir)
        status = "FINISHED"
    finally:
        finish_study_run(study, status)
    reconcile_study(study, study_dir, log)  # trials that crashed between result and run finish
    done = results_mod.finished_results(study_dir)
    missing = [r["name"] for r in records if r["trial_id"] not in done]
    table = results_mod.build_table([done[r["trial_id"]] for r in records
                                     if r["trial_id"] in done])
    path = results_mod.write_table(table, study_dir) if len(table) else "not written"
    log(f"trials table: {path} ({len(table)} rows"
        + (f"; {len(missing)} cells did not finish: {missing}" if missing else "") + ")")
    return table


def run_search_study(spec: StudySpec, dirs: dict[str, str], tracking_uri: str,
                     smoke_test: bool) -> pd.DataFrame:
    init_ray()
    study = start_study_run(tracking_uri, spec.name, spec.study_dir,
                            params=study_params(spec, dirs), datasets=dirs)
    provenance.write(spec.study_dir, provenance.collect(spec, dirs, tracking_uri, study,
                                                        smoke_test))
    reconcile_study(study, spec.study_dir, log)
    status = "FAILED"
    try:
        run_optuna(spec, dirs, study, smoke_test)
        status = "FINISHED"
    finally:
        finish_study_run(study, status)
    reconcile_study(study, spec.study_dir, log)
    table = results_mod.build_table(list(results_mod.finished_results(spec.study_dir).values()))
    path = results_mod.write_table(table, spec.study_dir) if len(table) else "not written"
    log(f"trials table: {path} ({len(table)} rows)")
    return table
