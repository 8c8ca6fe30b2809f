"""The study driver: datasets once, cells from the spec, Ray Tune over the unfinished ones.

    spec -> prepare datasets -> cells (trial id = config hash) -> skip finished cells
         -> one Tune run: trained methods first (Native saves its weights); each post-hoc
            method on the Native weights of the same (dataset, depth, seed) once that Native
            cell has ended (study/cell_order.py)
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
from dataclasses import asdict, replace
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


def trial_record(spec: StudySpec, dataset: str, cfg: TrialConfig, meta: dict,
                 device_bytes: int | None) -> dict:
    """The plain dict that travels to a trial (grid cell or sampled point alike): config, ids,
    resources, checkpoint paths."""
    trial_id = config_hash(cfg, meta["dataset_id"])
    method = get_method(cfg.method)
    res = trial_resources(cfg, meta["vocab_size"], spec.resources.cpus_per_trial,
                          spec.resources.gpus, device_bytes, spec.resources.gpu_fraction_step)
    record = {"trial_id": trial_id, "config": cfg.to_dict(), "dataset": dataset,
              "dataset_id": meta["dataset_id"],
              "label_stream_auc": provenance.label_stream_auc(meta["stats"]),
              "category": method.category, "workflow": method.workflow,
              "resources": res, "gpu_fraction": res["gpu"],
              "estimated_memory_bytes": estimate_peak_bytes(cfg, meta["vocab_size"]),
              "name": f"{dataset}-{cfg.method}-d{cfg.depth}-s{cfg.seed}-{trial_id[:6]}"}
    if cfg.method == "native":
        record["save_checkpoint"] = str(checkpoint_path(spec.study_dir, trial_id))
    if method.workflow == "post-hoc":
        twin = config_hash(native_twin(cfg), meta["dataset_id"])
        record["twin_id"] = twin
        record["native_checkpoint"] = str(checkpoint_path(spec.study_dir, twin))
    return record


def cell_records(spec: StudySpec, cells: list[Cell], device_bytes: int | None) -> list[dict]:
    """The records of the grid's cells, plus the Native twin of every post-hoc cell."""
    metas = {c.config.dataset: read_meta(c.config.dataset) for c in cells}
    by_id, twins = {}, []
    for cell in cells:
        if get_method(cell.config.method).workflow == "post-hoc":
            twins.append(Cell(cell.dataset, native_twin(cell.config)))
    for cell in twins + cells:  # twins first; a spec that lists native anyway dedups here
        record = trial_record(spec, cell.dataset, cell.config, metas[cell.config.dataset],
                              device_bytes)
        by_id.setdefault(record["trial_id"], record)
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
    """Tune callback: one line per finished trial with the study's ETA."""

    def __init__(self, total: int):
        from ray.tune import Callback

        class Cb(Callback):
            def on_trial_complete(cb_self, iteration, trials, trial, **info):
                self.done += 1
                elapsed = time.time() - self.start
                eta = elapsed / self.done * (self.total - self.done)
                status = (trial.last_result or {}).get("status", "?")
                log(f"{self.done}/{self.total} cells done ({_label(trial)}: "
                    f"{status}); elapsed {elapsed:.0f}s, ETA {eta:.0f}s")

        self.total, self.done, self.start, self.callback = total, 0, time.time(), Cb()


def _label(trial) -> str:
    """A grid trial's cell name; a sampled point has none before it runs."""
    cfg = trial.config
    return cfg.get("cell_name") or f"{cfg.get('method')} d{cfg.get('depth')} {trial.trial_id}"


def fit_tuner(spec: StudySpec, name: str, trainable, resources, param_space: dict,
              total: int, **tune_config) -> None:
    """The one Tuner set-up of both drivers: per-trial `resources` (a dict, or config -> dict),
    no Tune retries (a failure is a result row, never a re-run), the progress line."""
    from ray import tune

    progress = _Progress(total)
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space=param_space,
        # reuse_actors: a slot's worker process runs cell after cell (a fresh process per cell
        # costs seconds of imports); run_cell leaves no state behind but the peak-RSS counter,
        # which it resets (trainable.reset_peak_memory).
        tune_config=tune.TuneConfig(max_concurrent_trials=spec.resources.max_concurrent_trials,
                                    reuse_actors=True, **tune_config),
        run_config=tune.RunConfig(name=name, storage_path=tune_storage_path(spec),
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[progress.callback], verbose=1),
    )
    tuner.fit()


def run_phase(name: str, spec: StudySpec, records: list[dict], study, samples) -> None:
    """One Tune run over `records` (in `cell_order.start_order`), post-hoc cells held back
    until their Native twin has ended (`cell_order.CellSearcher`)."""
    from malloc_ray.study.cell_order import CellSearcher
    from malloc_ray.study.trainable import tune_trainable

    if not records:
        return
    post_hoc = sum(r["workflow"] == "post-hoc" for r in records)
    log(f"{name}: {len(records) - post_hoc} trained, {post_hoc} post-hoc (each once its "
        "Native cell has ended)")
    by_name = {r["name"]: r for r in records}
    # Resolved here, in the driver: Tune runs each trial in its own working directory.
    study_dir = str(spec.study_dir)

    def trainable(config):
        rec = by_name[config["cell_name"]]
        key = samples_key(rec["dataset"], rec["config"])
        tune_trainable({"cell": rec}, study=study, study_dir=study_dir,
                       samples={rec["dataset"]: samples.get(key)})

    fit_tuner(spec, f"{spec.name}-{name}", trainable,
              lambda config: by_name[config["cell_name"]]["resources"], {},
              total=len(records), search_alg=CellSearcher(records), num_samples=len(records),
              trial_name_creator=lambda t: t.config["cell_name"],
              trial_dirname_creator=lambda t: t.config["cell_name"])


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


def resolve_point(spec: StudySpec, dataset: str, dataset_dir: str, point: dict,
                  smoke_test: bool) -> TrialConfig:
    """A sampled point's config, resolved exactly as a grid cell's: `expand_cells` over a
    one-cell grid (trial defaults, the method's hparams, `overrides`, smoke). The sampled keys
    take the place of the spec's `trial` values, so an override that sets one wins, as it wins
    over `trial` in a grid."""
    point = dict(point)
    one = replace(spec, datasets=[d for d in spec.datasets if d.name == dataset],
                  methods=[point.pop("method")], depths=[point.pop("depth")],
                  seeds=spec.seeds[:1], trial={**spec.trial, **point})
    (cell,) = expand_cells(one, {dataset: dataset_dir}, smoke_test)
    return cell.config


def search_record(spec: StudySpec, dataset: str, dataset_dir: str, meta: dict, point: dict,
                  smoke_test: bool, device_bytes: int | None, have) -> dict:
    """The record of a sampled point; `have`: the samples keys the driver materialized."""
    cfg = resolve_point(spec, dataset, dataset_dir, point, smoke_test)
    if cfg.loader == "ray" and samples_key(dataset, cfg.to_dict()) not in have:
        # no driver-made rows for this selection: no Ray tasks inside a trial (see
        # materialize_samples)
        cfg = TrialConfig.from_dict({**cfg.to_dict(), "loader": "local"})
    record = trial_record(spec, dataset, cfg, meta, device_bytes)
    # Nothing in a search reads Native's weights (post-hoc methods are not searched); saving
    # every sampled Native would only fill the disk.
    record.pop("save_checkpoint", None)
    return record


def optuna_search(spec: StudySpec, dataset: str, storage):
    """TPE for one objective, NSGA-II for several; the Optuna study lives in `storage`."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from malloc_ray.study.nsga2 import PicklableNSGAIISampler
    from malloc_ray.study.spec import OBJECTIVES

    objectives = spec.search.objectives
    modes = [OBJECTIVES[o] for o in objectives]
    multi = len(objectives) > 1
    sampler = (PicklableNSGAIISampler(seed=spec.search.seed) if multi
               else optuna.samplers.TPESampler(seed=spec.search.seed))
    return OptunaSearch(metric=objectives if multi else objectives[0],
                        mode=modes if multi else modes[0], sampler=sampler, storage=storage,
                        study_name=f"{spec.name}-{dataset}", seed=spec.search.seed)


def run_search(spec: StudySpec, dataset: str, dataset_dir: str, methods: list[str], study,
               smoke_test: bool, budget: int, storage, device_bytes: int | None) -> None:
    """`budget` more Optuna trials on one dataset."""
    from ray import tune

    from malloc_ray.study.trainable import run_cell

    meta = read_meta(dataset_dir)
    # Rows for every (method, depth) the search can pick at the spec's own trial values;
    # materialize_samples makes each selection once.
    samples = materialize_samples([
        {"dataset": dataset,
         "config": resolve_point(spec, dataset, dataset_dir, {"method": m, "depth": d},
                                 smoke_test).to_dict()}
        for m in methods for d in spec.depths])
    have = set(samples)  # the driver's resource calls need the keys only
    objectives, study_dir = spec.search.objectives, str(spec.study_dir)

    def record(config: dict) -> dict:
        return search_record(spec, dataset, dataset_dir, meta, config, smoke_test,
                             device_bytes, have)

    def trainable(config, samples=None):
        rec = record(config)
        result = run_cell(rec, study, study_dir,
                          (samples or {}).get(samples_key(dataset, rec["config"])))
        tune.report({o: result.get(o) if result.get(o) is not None else float("nan")
                     for o in objectives} | {"status": result["status"]})

    fit_tuner(spec, f"{spec.name}-{dataset}-optuna",
              tune.with_parameters(trainable, samples=samples),
              lambda config: record(config)["resources"], search_space(spec, methods),
              total=budget, search_alg=optuna_search(spec, dataset, storage),
              num_samples=budget)


def run_optuna(spec: StudySpec, dirs: dict[str, str], study, smoke_test: bool) -> None:
    """One Optuna search per dataset over the trained methods; single objective with TPE, or
    several (e.g. auc and kv_bytes_per_user, payload + metadata) with NSGA-II. The Optuna
    study is stored in <study>/optuna.db beside MLflow. Post-hoc methods are not searched
    (they need a Native model of the same cell); run them in a grid study."""
    import optuna

    methods = [m for m in spec.methods if get_method(m).workflow == "trained"]
    storage = optuna.storages.RDBStorage(f"sqlite:///{spec.study_dir / 'optuna.db'}")
    device_bytes = cuda_device_bytes()
    for ds in spec.datasets:
        done = [r for r in results_mod.finished_results(spec.study_dir).values()
                if r["dataset"] == ds.name]
        budget = (smoke.SEARCH_SAMPLES if smoke_test else spec.search.num_samples) - len(done)
        log(f"optuna on {ds.name}: {len(done)} trials finished, {max(budget, 0)} to run")
        if budget > 0:
            run_search(spec, ds.name, dirs[ds.name], methods, study, smoke_test, budget,
                       storage, device_bytes)


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


class StudyStopped(Exception):
    """The Tune run ended with cells that have no result: it was stopped (Ctrl-C, SIGTERM)
    before they ran. Baselines do not run; a post-hoc cell whose Native twin had not ended
    never started (it needs the twin's weights)."""

    def __init__(self, missing: list[dict], total: int):
        post_hoc = sum(r["workflow"] == "post-hoc" for r in missing)
        super().__init__(f"study stopped: {len(missing)} of {total} cells have no result "
                         f"({len(missing) - post_hoc} trained, {post_hoc} post-hoc), so "
                         "nothing after them ran; `malloc-ray study resume SPEC` runs what "
                         "is left")


def _check_cells_finished(records: list[dict], study_dir: Path) -> None:
    finished = results_mod.finished_results(study_dir)
    missing = [r for r in records if r["trial_id"] not in finished]
    if missing:
        raise StudyStopped(missing, len(records))


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
    init_ray()
    if spec.search.mode == "optuna":
        # An Optuna search has no rows before it runs: its table is every finished result.
        return run_lifecycle(spec, dirs, tracking_uri, smoke_test,
                             lambda study: run_optuna(spec, dirs, study, smoke_test))
    cells = expand_cells(spec, dirs, smoke_test)
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

    def grid(study) -> None:
        from malloc_ray.study.cell_order import start_order

        samples = materialize_samples(todo)
        cells = start_order(todo)  # trained first: a loop over them (no Tune) is valid too
        run_phase("cells", spec, cells, study, samples)
        _check_cells_finished(cells, study_dir)
        run_baselines(baselines_todo, study, study_dir)

    return run_lifecycle(spec, dirs, tracking_uri, smoke_test, grid, records)


def run_lifecycle(spec: StudySpec, dirs: dict[str, str], tracking_uri: str, smoke_test: bool,
                  body, records: list[dict] | None = None) -> pd.DataFrame:
    """The one study lifecycle around `body(study)` (grid phases, or Optuna searches): the
    parent run, provenance, the trials table. `records`: the table's rows in order (None:
    every finished result)."""
    study_dir = spec.study_dir
    study = start_study_run(tracking_uri, spec.name, study_dir, params=study_params(spec, dirs),
                            datasets=dirs)
    provenance.write(study_dir, provenance.collect(spec, dirs, tracking_uri, study, smoke_test))
    reconcile_study(study, study_dir, log)  # what a killed driver left: one child run per cell
    status = "FAILED"
    try:
        body(study)
        status = "FINISHED"
    finally:
        finish_study_run(study, status)
    reconcile_study(study, study_dir, log)  # trials that crashed between result and run finish
    return write_trials_table(study_dir, records)


def write_trials_table(study_dir: Path, records: list[dict] | None) -> pd.DataFrame:
    done = results_mod.finished_results(study_dir)
    wanted = [r["trial_id"] for r in records] if records is not None else list(done)
    missing = [r["name"] for r in records or [] if r["trial_id"] not in done]
    table = results_mod.build_table([done[t] for t in wanted if t in done])
    path = results_mod.write_table(table, study_dir) if len(table) else "not written"
    log(f"trials table: {path} ({len(table)} rows"
        + (f"; {len(missing)} cells did not finish: {missing}" if missing else "") + ")")
    return table
