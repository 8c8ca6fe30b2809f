"""Study specs: YAML -> a validated StudySpec -> the list of cells (trial configs) to run.

A study is dataset x method x depth x seed (x hparams). Unknown keys anywhere are errors that
name the key. Example (experiments/quickstart.yaml):

    name: quickstart
    datasets:
      kuai: {prepare: {source: synthetic, profile: kuaivideo, users: 300, max_len: 64}}
    methods: [native, wo_mem, mqa, gqa]
    depths: [1, 2]
    seeds: [0, 1]
    trial: {d_model: 32, max_len: 64, epochs: 3}
    hparams: {gqa: {kv_heads: 2}}
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from malloc_ray.config import TrialConfig
from malloc_ray.errors import InputError

CELL_KEYS = ("dataset", "method", "depth", "seed", "hparams")  # set by the grid, not `trial`
SEARCH_MODES = ("grid", "optuna")
# Memory is `kv_bytes_per_user` (payload + metadata); payload alone is not an objective, since
# optimising it rewards moving state into metadata.
OBJECTIVES = {"auc": "max", "gauc": "max", "logloss": "min",
              "kv_bytes_per_user": "min", "macs_per_request": "min"}


def _check_keys(raw: Any, allowed: set[str], where: str, file: str | None) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InputError(f"expected a mapping, got {type(raw).__name__}", file=file, key=where)
    for key in raw:
        if key not in allowed:
            raise InputError(f"unknown key; allowed: {', '.join(sorted(allowed))}", file=file,
                             key=f"{where}.{key}" if where else key)
    return raw


@dataclass
class DatasetSpec:
    name: str
    path: str | None = None          # an already prepared dataset dir
    prepare: dict | None = None      # or a recipe for malloc_ray.data.prepare.prepare


@dataclass
class SearchSpec:
    mode: str = "grid"
    num_samples: int = 8                                 # optuna: trials per (dataset, method)
    space: dict[str, dict] = field(default_factory=dict)  # optuna: {trial key: {dist: args}}
    objectives: list[str] = field(default_factory=lambda: ["auc"])
    seed: int = 0


@dataclass
class ResourceSpec:
    cpus_per_trial: float = 1.0
    gpus: str | float = "auto"       # auto: estimate per trial on CUDA machines, 0 elsewhere
    max_concurrent_trials: int | None = None
    gpu_fraction_step: float = 0.125  # fractions are rounded up to 1/8 of a device


@dataclass
class StudySpec:
    name: str
    datasets: list[DatasetSpec]
    methods: list[str]
    depths: list[int] = field(default_factory=lambda: [2])
    seeds: list[int] = field(default_factory=lambda: [0])
    trial: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, dict] = field(default_factory=dict)
    overrides: list[dict] = field(default_factory=list)  # [{match: {...}, set: {...}}]
    search: SearchSpec = field(default_factory=SearchSpec)
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    output_dir: str = "runs"
    # Ray Tune's experiment storage: a path or an s3:// / gs:// URI (default <study>/ray_results)
    storage_path: str | None = None
    # the user's word that output_dir (and a local storage_path) is one mount on every node
    shared_storage: bool = False
    mlflow_tracking_uri: str | None = None
    # what --smoke-test runs instead: {datasets, methods, depths, seeds, trial} (smoke_spec)
    smoke: dict = field(default_factory=dict)
    source_file: str | None = None

    @property
    def study_dir(self) -> Path:
        return Path(self.output_dir).expanduser().resolve() / self.name


def load_spec(path: str | Path) -> StudySpec:
    file = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"cannot read study spec: {exc.strerror}", file=file) from exc
    except yaml.YAMLError as exc:
        raise InputError(f"not valid YAML: {exc}", file=file) from exc
    return parse_spec(raw, file=file)


def parse_spec(raw: Any, file: str | None = None) -> StudySpec:
    top = {f.name for f in dataclasses.fields(StudySpec)} - {"source_file", "mlflow_tracking_uri"}
    raw = _check_keys(raw, top | {"mlflow"}, "", file)
    for key in ("name", "datasets", "methods"):
        if key not in raw:
            raise InputError("required key is missing", file=file, key=key)
    datasets = _parse_datasets(raw["datasets"], "datasets", file)
    smoke = _parse_smoke(raw.pop("smoke", None), {d.name for d in datasets}, file)
    mlflow = _check_keys(raw.pop("mlflow", None), {"tracking_uri"}, "mlflow", file)
    search = SearchSpec(**_check_keys(raw.pop("search", None),
                                      {f.name for f in dataclasses.fields(SearchSpec)}, "search",
                                      file))
    resources = ResourceSpec(**_check_keys(raw.pop("resources", None),
                                           {f.name for f in dataclasses.fields(ResourceSpec)},
                                           "resources", file))
    raw = {k: v for k, v in raw.items() if k != "datasets"}
    spec = StudySpec(datasets=datasets, search=search, resources=resources, smoke=smoke,
                     mlflow_tracking_uri=mlflow.get("tracking_uri"), source_file=file, **raw)
    _validate(spec, file)
    return spec


def _parse_datasets(raw: Any, where: str, file: str | None) -> list[DatasetSpec]:
    datasets = []
    for name, ds in _check_keys(raw, set(raw or {}), where, file).items():
        ds = _check_keys(ds, {"path", "prepare"}, f"{where}.{name}", file)
        if bool(ds.get("path")) == bool(ds.get("prepare")):
            raise InputError("give exactly one of 'path' or 'prepare'", file=file,
                             key=f"{where}.{name}")
        datasets.append(DatasetSpec(name=name, **ds))
    return datasets


def _parse_smoke(raw: Any, dataset_names: set[str], file: str | None) -> dict:
    """The spec's `smoke:` section: what --smoke-test runs instead (see smoke_spec)."""
    smoke = dict(_check_keys(raw, {"datasets", "methods", "depths", "seeds", "trial"}, "smoke",
                             file))
    if "datasets" in smoke:
        smoke["datasets"] = _parse_datasets(smoke["datasets"], "smoke.datasets", file)
        for ds in smoke["datasets"]:
            if ds.name not in dataset_names:
                raise InputError("a smoke dataset replaces a dataset of the same key; there is "
                                 "none", file=file, key=f"smoke.datasets.{ds.name}")
    if not isinstance(smoke.get("trial", {}), dict):
        raise InputError("expected a mapping of trial keys", file=file, key="smoke.trial")
    for key in ("methods", "depths", "seeds"):
        if key in smoke and (not isinstance(smoke[key], list) or not smoke[key]):
            raise InputError("must be a non-empty list", file=file, key=f"smoke.{key}")
    return smoke


def smoke_spec(spec: StudySpec) -> StudySpec:
    """The spec --smoke-test runs: its `smoke:` section's datasets replace those of the same
    key (e.g. small synthetic stand-ins for data CI does not have), its methods, depths and
    seeds replace the grid's, and its `trial` keys update the spec's (e.g. device: cpu).
    Without a section, the spec itself."""
    smoke = spec.smoke
    if not smoke:
        return spec
    swap = {d.name: d for d in smoke.get("datasets", [])}
    methods = smoke.get("methods", spec.methods)
    out = dataclasses.replace(
        spec, datasets=[swap.get(d.name, d) for d in spec.datasets], methods=methods,
        hparams={m: hp for m, hp in spec.hparams.items() if m in methods},
        depths=smoke.get("depths", spec.depths),
        seeds=smoke.get("seeds", spec.seeds), trial={**spec.trial, **smoke.get("trial", {})},
        smoke={})
    _validate(out, spec.source_file)
    return out


def _validate(spec: StudySpec, file: str | None) -> None:
    from malloc_ray.methods import get_method

    trial_keys = {f.name for f in dataclasses.fields(TrialConfig)} - set(CELL_KEYS)
    _check_keys(spec.trial, trial_keys, "trial", file)
    for name in spec.methods:
        get_method(name)
    for name, hp in spec.hparams.items():
        if name not in spec.methods:
            raise InputError("hyperparameters for a method the study does not run", file=file,
                             key=f"hparams.{name}")
        get_method(name).parse_hparams(hp)
    for i, rule in enumerate(spec.overrides):
        rule = _check_keys(rule, {"match", "set"}, f"overrides[{i}]", file)
        _check_keys(rule.get("match"), set(CELL_KEYS) - {"hparams"}, f"overrides[{i}].match", file)
        _check_keys(rule.get("set"), trial_keys, f"overrides[{i}].set", file)
    if spec.search.mode not in SEARCH_MODES:
        raise InputError(f"must be one of {SEARCH_MODES}", file=file, key="search.mode")
    for objective in spec.search.objectives:
        if objective not in OBJECTIVES:
            raise InputError(f"unknown objective; known: {', '.join(OBJECTIVES)}", file=file,
                             key="search.objectives")
    if not isinstance(spec.shared_storage, bool):
        raise InputError("must be true or false", file=file, key="shared_storage")
    if spec.storage_path is not None and not isinstance(spec.storage_path, str):
        raise InputError("must be a path or a URI string", file=file, key="storage_path")
    for key, value in (("depths", spec.depths), ("seeds", spec.seeds)):
        if not value or not all(isinstance(v, int) for v in value):
            raise InputError("must be a non-empty list of integers", file=file, key=key)


@dataclass
class Cell:
    """One (dataset, method, depth, seed) point of the study with its resolved config."""

    dataset: str          # the dataset's key in the spec
    config: TrialConfig

    @property
    def key(self) -> tuple:
        c = self.config
        return (self.dataset, c.method, c.depth, c.seed)


def expand_cells(spec: StudySpec, dataset_dirs: dict[str, str],
                 smoke_test: bool = False) -> list[Cell]:
    """The grid, with trial defaults, per-method hparams and overrides applied."""
    cells = []
    depths, seeds = spec.depths, spec.seeds
    if smoke_test:  # every method and dataset, but the two shallowest depths and one seed
        depths, seeds = sorted(depths)[:2], seeds[:1]
    for ds, method, depth, seed in itertools.product(spec.datasets, spec.methods, depths, seeds):
        raw = {**spec.trial, "dataset": dataset_dirs[ds.name], "method": method, "depth": depth,
               "seed": seed, "hparams": dict(spec.hparams.get(method, {}))}
        for rule in spec.overrides:
            where = {"dataset": ds.name, "method": method, "depth": depth, "seed": seed}
            if all(where.get(k) == v for k, v in (rule.get("match") or {}).items()):
                raw.update(rule.get("set") or {})
        if smoke_test:
            raw.update(smoke_overrides(raw))
        cells.append(Cell(ds.name, TrialConfig.from_dict(raw)))
    return cells


def smoke_overrides(raw: dict) -> dict:
    """Shrink any trial to seconds: one short epoch of a narrow model."""
    return {"epochs": 1, "max_steps_per_epoch": 3, "d_model": min(raw.get("d_model", 64), 32),
            "num_heads": min(raw.get("num_heads", 4), 4), "max_len": min(raw.get("max_len", 128), 32)}
