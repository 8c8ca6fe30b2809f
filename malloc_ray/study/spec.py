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
    baselines: [popularity, cooc]   # one row per dataset each (train/baselines.py BASELINES)
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from malloc_ray.config import TrialConfig, has_type
from malloc_ray.errors import InputError
from malloc_ray import smoke
from malloc_ray.files import check_name, check_writable_dir, load_yaml

CELL_KEYS = ("dataset", "method", "depth", "seed", "hparams")  # set by the grid, not `trial`
SEARCH_MODES = ("grid", "optuna")
# Memory is `kv_bytes_per_user` (payload + metadata); payload alone is not an objective, since
# optimising it rewards moving state into metadata.
OBJECTIVES = {"auc": "max", "gauc": "max", "logloss": "min",
              "kv_bytes_per_user": "min", "macs_per_request": "min"}
# search.space: {trial key: {distribution: [args]}}, with this many args (choice: any number)
DISTRIBUTIONS = {"uniform": 2, "loguniform": 2, "choice": None, "randint": 2, "quniform": 3}


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
    # reference scores run once per dataset in the driver (train/baselines.py BASELINES)
    baselines: list[str] = field(default_factory=list)
    search: SearchSpec = field(default_factory=SearchSpec)
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    output_dir: str = "runs"
    # Ray Tune's experiment storage: a path or an s3:// / gs:// URI (default <study>/ray_results)
    storage_path: str | None = None
    # the user's word that output_dir (and a local storage_path) is one mount on every node
    shared_storage: bool = False
    mlflow_tracking_uri: str | None = None
    # what --smoke-test runs instead: {datasets, methods, depths, seeds, baselines, trial}
    smoke: dict = field(default_factory=dict)
    source_file: str | None = None

    @property
    def study_dir(self) -> Path:
        return Path(self.output_dir).expanduser().resolve() / self.name


def load_spec(path: str | Path) -> StudySpec:
    return parse_spec(load_yaml(path, "study spec"), file=str(path))


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
    if not isinstance(raw, dict) or not raw:
        raise InputError("must be a non-empty mapping of dataset key -> {path: DIR} or "
                         f"{{prepare: RECIPE}}, got {raw!r}", file=file, key=where)
    datasets = []
    for name, ds in raw.items():
        check_name(name, where, file)  # the key names <study>/data/<key>
        ds = _check_keys(ds, {"path", "prepare"}, f"{where}.{name}", file)
        if bool(ds.get("path")) == bool(ds.get("prepare")):
            raise InputError("give exactly one of 'path' or 'prepare'", file=file,
                             key=f"{where}.{name}")
        for key, kind, what in (("path", str, "a directory path"),
                                ("prepare", dict, "a mapping {source: ..., options}")):
            if ds.get(key) is not None and not isinstance(ds[key], kind):
                raise InputError(f"must be {what}, got {ds[key]!r}", file=file,
                                 key=f"{where}.{name}.{key}")
        datasets.append(DatasetSpec(name=name, **ds))
    return datasets


def _parse_smoke(raw: Any, dataset_names: set[str], file: str | None) -> dict:
    """The spec's `smoke:` section: what --smoke-test runs instead (see smoke_spec)."""
    section = dict(_check_keys(raw, {"datasets", "methods", "depths", "seeds", "baselines",
                                      "trial"}, "smoke", file))
    if "datasets" in section:
        section["datasets"] = _parse_datasets(section["datasets"], "smoke.datasets", file)
        for ds in section["datasets"]:
            if ds.name not in dataset_names:
                raise InputError("a smoke dataset replaces a dataset of the same key; there is "
                                 "none", file=file, key=f"smoke.datasets.{ds.name}")
    if not isinstance(section.get("trial", {}), dict):
        raise InputError("expected a mapping of trial keys", file=file, key="smoke.trial")
    for key in ("methods", "depths", "seeds"):
        if key in section and (not isinstance(section[key], list) or not section[key]):
            raise InputError("must be a non-empty list", file=file, key=f"smoke.{key}")
    if "baselines" in section:  # may be empty: a smoke test without the baselines
        _check_baselines(section["baselines"], file, "smoke.baselines")
    return section


def smoke_spec(spec: StudySpec) -> StudySpec:
    """The spec --smoke-test runs: its `smoke:` section's datasets replace those of the same
    key (e.g. small synthetic stand-ins for data CI does not have), its methods, depths,
    seeds and baselines replace the spec's (baselines: the spec's unless the section names
    them), and its `trial` keys update the spec's (e.g. device: cpu).
    Without a section, the spec itself."""
    section = spec.smoke
    if not section:
        return spec
    swap = {d.name: d for d in section.get("datasets", [])}
    methods = section.get("methods", spec.methods)
    out = dataclasses.replace(
        spec, datasets=[swap.get(d.name, d) for d in spec.datasets], methods=methods,
        hparams={m: hp for m, hp in spec.hparams.items() if m in methods},
        depths=section.get("depths", spec.depths),
        seeds=section.get("seeds", spec.seeds), trial={**spec.trial, **section.get("trial", {})},
        baselines=section.get("baselines", spec.baselines),
        smoke={})
    _validate(out, spec.source_file)
    return out


def _int(low: int):
    return lambda v: has_type(v, int) and v >= low


def _ints(low: int):
    return lambda v: isinstance(v, list) and bool(v) and all(map(_int(low), v))


def _mapping(v) -> bool:
    return isinstance(v, dict)


def _number(low: float, high: float = float("inf")):
    return lambda v: has_type(v, float) and low < v <= high


# (key, test, what it must be): every top-level value's type and range; `key` is also the
# StudySpec attribute path, except where _ATTRS says otherwise.
_FIELDS = (
    ("methods", lambda v: isinstance(v, list) and bool(v) and all(isinstance(m, str) for m in v),
     "a non-empty list of method names"),
    ("depths", _ints(1), "a non-empty list of positive integers"),
    ("seeds", _ints(0), "a non-empty list of integers >= 0"),
    ("trial", _mapping, "a mapping of trial config keys"),
    ("hparams", lambda v: _mapping(v) and all(map(_mapping, v.values())),
     "a mapping of method -> {hyperparameter: value}"),
    ("overrides", lambda v: isinstance(v, list) and all(map(_mapping, v)),
     "a list of {match: ..., set: ...} rules"),
    ("baselines", lambda v: isinstance(v, list) and all(isinstance(b, str) for b in v),
     "a list of baseline names"),
    ("output_dir", lambda v: isinstance(v, str) and bool(v), "a directory path"),
    ("storage_path", lambda v: v is None or isinstance(v, str), "a path or a URI string"),
    ("shared_storage", lambda v: isinstance(v, bool), "true or false"),
    ("mlflow.tracking_uri", lambda v: v is None or isinstance(v, str), "a URI string"),
    ("search.mode", lambda v: v in SEARCH_MODES, f"one of {', '.join(SEARCH_MODES)}"),
    ("search.num_samples", _int(1), "a positive integer"),
    ("search.space", _mapping, "a mapping of trial key -> {distribution: [args]}"),
    ("search.objectives", lambda v: isinstance(v, list) and bool(v) and all(
        isinstance(o, str) and o in OBJECTIVES for o in v),
     f"a non-empty list of objectives ({', '.join(OBJECTIVES)})"),
    ("search.seed", _int(0), "an integer >= 0"),
    ("resources.cpus_per_trial", _number(0), "a number > 0"),
    ("resources.gpus", lambda v: v == "auto" or (has_type(v, float) and v >= 0),
     "'auto' or a number >= 0"),
    ("resources.max_concurrent_trials", lambda v: v is None or _int(1)(v),
     "a positive integer or null"),
    ("resources.gpu_fraction_step", _number(0, 1), "a number in (0, 1]"),
)
_ATTRS = {"mlflow.tracking_uri": "mlflow_tracking_uri"}


def _validate(spec: StudySpec, file: str | None) -> None:
    """The one check of a whole spec, run before anything is written or Ray starts: types and
    ranges, names, methods and their hparams, overrides, the search space, prepare recipes,
    and every cell's resolved TrialConfig."""
    from malloc_ray.data.prepare import check_recipe
    from malloc_ray.methods import get_method

    for key, test, what in _FIELDS:
        value = operator.attrgetter(_ATTRS.get(key, key))(spec)
        if not test(value):
            raise InputError(f"must be {what}, got {value!r}", file=file, key=key)
    check_name(spec.name, "name", file)  # the study dir and Tune's experiment dirs
    trial_keys = {f.name for f in dataclasses.fields(TrialConfig)} - set(CELL_KEYS)
    _check_keys(spec.trial, trial_keys, "trial", file)
    for name in spec.methods:
        _at("methods", file, lambda: get_method(name), sub=False)
    _check_baselines(spec.baselines, file)
    if spec.baselines and spec.search.mode != "grid":
        raise InputError("baselines run in grid studies only (an Optuna search would count "
                         "their rows against its budget); run them in a grid study",
                         file=file, key="baselines")
    for name, hp in spec.hparams.items():
        if name not in spec.methods:
            raise InputError("hyperparameters for a method the study does not run", file=file,
                             key=f"hparams.{name}")
        _at(f"hparams.{name}", file, lambda: get_method(name).parse_hparams(hp))
    for i, rule in enumerate(spec.overrides):
        rule = _check_keys(rule, {"match", "set"}, f"overrides[{i}]", file)
        _check_keys(rule.get("match"), set(CELL_KEYS) - {"hparams"}, f"overrides[{i}].match", file)
        _check_keys(rule.get("set"), trial_keys, f"overrides[{i}].set", file)
    _check_space(spec.search.space, trial_keys | {"method", "depth"}, file)
    for ds in spec.datasets:
        if ds.prepare:
            _at(f"datasets.{ds.name}.prepare", file, lambda: check_recipe(ds.prepare))
    _check_cells(spec, file)


def _check_baselines(names: Any, file: str | None, key: str = "baselines") -> None:
    """Known baseline names, each once; din and bst need the optional extra [peers], so a
    spec that lists them without it fails now, not after the grid has run."""
    from malloc_ray.train.baselines import BASELINES, PEERS

    if not isinstance(names, list) or not all(isinstance(b, str) for b in names):
        raise InputError(f"must be a list of baseline names, got {names!r}", file=file, key=key)
    for name in names:
        if name not in BASELINES:
            raise InputError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}",
                             file=file, key=key)
        if names.count(name) > 1:
            raise InputError(f"baseline {name!r} is listed twice", file=file, key=key)
        if name in PEERS:
            from malloc_ray.train.peers import import_rechub

            _at(key, file, lambda: import_rechub(name), sub=False)


def _check_space(space: dict, keys: set[str], file: str | None) -> None:
    for key, dist in space.items():
        if key not in keys:
            raise InputError(f"not a trial key; known: {', '.join(sorted(keys))}", file=file,
                             key=f"search.space.{key}")
        ok = _mapping(dist) and len(dist) == 1 and next(iter(dist)) in DISTRIBUTIONS
        if ok:
            (name, args), = dist.items()
            ok = isinstance(args, list) and bool(args) and DISTRIBUTIONS[name] in (None, len(args))
        if not ok:
            raise InputError(f"expected {{one of {', '.join(DISTRIBUTIONS)}: [args]}} (uniform, "
                             "loguniform, randint: [low, high]; quniform: [low, high, q]; "
                             "choice: [values])", file=file, key=f"search.space.{key}")


def _check_cells(spec: StudySpec, file: str | None) -> None:
    """Every cell's config, built as the run builds it (placeholder dataset dirs): a bad value
    from `trial` or an override fails now, not as an `error` row in every cell."""
    try:
        expand_cells(spec, {d.name: d.name for d in spec.datasets})
    except InputError as exc:
        where = next((f"overrides[{i}].set" for i, r in enumerate(spec.overrides)
                      if exc.key in (r.get("set") or {})), "trial")
        raise InputError(exc.message, file=file,
                         key=f"{where}.{exc.key}" if exc.key else where) from None


def _at(key: str, file: str | None, call, sub: bool = True):
    """`call()`; an InputError it raises is raised again located in the spec under `key`,
    plus the error's own key when `sub` (unless `key` already names it)."""
    try:
        return call()
    except InputError as exc:
        message = str(exc) if exc.file is not None or exc.row is not None else exc.message
        if sub and exc.key and exc.key not in key.split("."):
            key = f"{key}.{exc.key}"
        raise InputError(message, file=file, key=key) from None


def dataset_dir(spec: StudySpec, ds: DatasetSpec) -> Path:
    """Where dataset `ds` is prepared: its `path` (relative to the spec's file), else
    <study>/data/<key>."""
    if not ds.path:
        return spec.study_dir / "data" / ds.name
    path = Path(ds.path).expanduser()
    if not path.is_absolute() and spec.source_file:
        path = Path(spec.source_file).parent / path
    return path.resolve()


def check_files(spec: StudySpec) -> None:
    """What the spec names on disk, checked before a study creates anything: prepared
    datasets are dataset dirs, recipe inputs exist (unless already prepared), and the study
    dir can be written. (The spec's own values were checked when it was parsed.)"""
    from malloc_ray.data.prepare import read_meta

    for ds in spec.datasets:
        if ds.path:
            _at(f"datasets.{ds.name}.path", spec.source_file,
                lambda: read_meta(dataset_dir(spec, ds)))
        elif "path" in ds.prepare and not dataset_dir(spec, ds).exists() \
                and not Path(str(ds.prepare["path"])).expanduser().exists():
            raise InputError(f"no such file or directory: {ds.prepare['path']!r} (recipe paths "
                             "are relative to the directory you run from)",
                             file=spec.source_file, key=f"datasets.{ds.name}.prepare.path")
    check_writable_dir(spec.study_dir, key="output_dir", file=spec.source_file)


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
    if smoke_test:
        depths, seeds = smoke.grid(depths, seeds)
    for ds, method, depth, seed in itertools.product(spec.datasets, spec.methods, depths, seeds):
        raw = {**spec.trial, "dataset": dataset_dirs[ds.name], "method": method, "depth": depth,
               "seed": seed, "hparams": dict(spec.hparams.get(method, {}))}
        for rule in spec.overrides:
            where = {"dataset": ds.name, "method": method, "depth": depth, "seed": seed}
            if all(where.get(k) == v for k, v in (rule.get("match") or {}).items()):
                raw.update(rule.get("set") or {})
        if smoke_test:
            raw.update(smoke.trial_overrides(raw))
        cells.append(Cell(ds.name, TrialConfig.from_dict(raw)))
    return cells

