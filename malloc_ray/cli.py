"""`malloc-ray` command line: thin argument parsing over the library.

Bad input (InputError) prints one line naming the file/row/key and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import yaml

from malloc_ray.errors import InputError


def _parse_hparam(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise InputError(f"expected KEY=VALUE, got {text!r}", key="--hparam")
    key, value = text.split("=", 1)
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        raise InputError(f"value of {key!r} is not valid YAML: {value!r}",
                         key="--hparam") from None


# Flags of `train` named differently from their trial field (kept for existing scripts).
FLAG_ALIASES = {"num_heads": ["--heads"]}
# Trial fields without a flag: a mapping (`--hparam` sets it) and the testing aid.
NO_FLAG = ("hparams", "fault")


def trial_flags(p: argparse.ArgumentParser, cls=None) -> list[str]:
    """One flag per scalar field of the trial config (`--max-len` for max_len), typed from
    the field, choices and help from config.py: a new trial field gets its flag here without
    an edit. Returns the field names, in order."""
    from malloc_ray.config import (CHOICES, FIELD_HELP, OPTIONAL_TYPES, TrialConfig)

    cls = cls or TrialConfig
    names = []
    for f in dataclasses.fields(cls):
        if f.name in NO_FLAG:
            continue
        kind = (OPTIONAL_TYPES.get(f.name, str) if f.default is None
                else type(f.default) if f.default is not dataclasses.MISSING else str)
        flags = [f"--{f.name.replace('_', '-')}", *FLAG_ALIASES.get(f.name, [])]
        extra = ({"action": argparse.BooleanOptionalAction} if kind is bool
                 else {"type": kind, "choices": CHOICES.get(f.name)})
        p.add_argument(*flags, dest=f.name, default=None, help=FIELD_HELP.get(f.name), **extra)
        names.append(f.name)
    return names


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train and evaluate one trial, print its metrics as JSON")
    p.add_argument("--config", help="trial config YAML; flags given explicitly override it")
    p.set_defaults(trial_fields=trial_flags(p), func=_cmd_train)
    p.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                   help="method hyperparameter (repeatable)")
    p.add_argument("--smoke-test", action="store_true", help="one short epoch of a narrow model")
    p.add_argument("--history", action="store_true", help="include per-evaluation history")


def _cmd_train(args) -> int:
    from malloc_ray.config import TrialConfig
    from malloc_ray.files import load_yaml
    from malloc_ray.train.trial import run_trial

    raw: dict = {}
    if args.config:
        raw = load_yaml(args.config, "trial config") or {}
        if not isinstance(raw, dict):
            raise InputError("expected a mapping of trial config keys", file=args.config)
    given = {k: getattr(args, k) for k in args.trial_fields if getattr(args, k) is not None}
    from_file = set(raw) - set(given)  # a bad value of these is the config file's
    raw.update(given)
    if args.hparam:
        if not isinstance(raw.get("hparams", {}), dict):
            raise InputError(f"must be a mapping, got {raw['hparams']!r}", file=args.config,
                             key="hparams")
        raw["hparams"] = {**raw.get("hparams", {}), **dict(map(_parse_hparam, args.hparam))}
    if args.smoke_test:
        from malloc_ray import smoke

        raw.update(smoke.trial_overrides(raw))
    if "dataset" not in raw:
        raise InputError("a dataset directory is required (--dataset DIR)", key="dataset")
    try:
        cfg = TrialConfig.from_dict(raw)
    except InputError as exc:
        if exc.file is None and exc.key in from_file:
            raise InputError(exc.message, file=args.config, key=exc.key) from None
        raise

    def progress(record: dict) -> None:
        print(f"epoch {record['epoch']}: train_loss={record['train_loss']:.4f} "
              f"valid_auc={record['valid_auc']:.4f} ({record['seconds']:.1f}s)", file=sys.stderr)

    result = run_trial(cfg, on_epoch=progress)
    if not args.history:
        result.pop("history", None)
    print(json.dumps(result, indent=2, default=float))
    return 0


def _baseline_parser(sub) -> None:
    p = sub.add_parser("baseline", help="reference scores on a dataset's split, as JSON: "
                       "popularity, cooc, torch-rechub DIN/BST (docs/baselines.md)")
    # = malloc_ray.train.baselines.BASELINES (not imported here: it loads torch)
    p.add_argument("kind", choices=["popularity", "cooc", "din", "bst"])
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p.add_argument("--max-len", type=int, default=None,
                   help="history window incl. the target (cooc, din, bst); default: the trial's")
    p.add_argument("--epochs", type=int, default=None,
                   help="din/bst epochs (default: the library trainer's, 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None,
                   help="din/bst batch size (default: the trial's)")
    p.add_argument("--embed-dim", type=int, default=None,
                   help="din/bst item embedding width (default: the trial's d_model)")
    p.add_argument("--patience", type=int, default=None,
                   help="din/bst early-stopping patience on valid AUC (default: 2)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="din/bst device (default: cuda when available)")
    p.add_argument("--smoke-test", action="store_true",
                   help="din/bst: one epoch of a few steps (checks the pipeline, not the model)")
    p.set_defaults(func=_cmd_baseline)


def _cmd_baseline(args) -> int:
    from malloc_ray.data.loader import load_dataset
    from malloc_ray.train.baselines import PEERS, run_baseline

    for key in ("max_len", "epochs", "batch_size", "embed_dim", "patience"):
        value = getattr(args, key)
        if value is not None and value < (2 if key == "max_len" else 1):
            raise InputError(f"must be >= {2 if key == 'max_len' else 1}, got {value}",
                             key="--" + key.replace("_", "-"))
    if args.kind in PEERS:  # before reading the dataset: a missing extra is the first thing said
        from malloc_ray.train.peers import import_rechub

        import_rechub(args.kind)
    peer = {k: getattr(args, k) for k in ("batch_size", "embed_dim", "patience", "device")
            if getattr(args, k) is not None}
    result = run_baseline(args.kind, load_dataset(args.dataset), args.split, max_len=args.max_len,
                          epochs=args.epochs, seed=args.seed, smoke_test=args.smoke_test, **peer)
    print(json.dumps(result, indent=2, default=float))
    return 0


def _methods_parser(sub) -> None:
    p = sub.add_parser("methods", help="list registered memory methods")
    p.set_defaults(func=_cmd_methods)


def _cmd_methods(args) -> int:
    from malloc_ray.methods import REGISTRY, method_names

    for name in method_names():
        cls = REGISTRY[name]
        print(f"{name:12s} category={cls.category:12s} workflow={cls.workflow}")
    return 0


def _study_parser(sub) -> None:
    p = sub.add_parser("study", help="run a study (Ray Tune + MLflow) from a YAML spec")
    study_sub = p.add_subparsers(dest="study_command", required=True)
    for name, help_text in (("run", "run every unfinished cell of a study"),
                            ("resume", "finish an interrupted study (same as run: finished "
                                       "cells are skipped)")):
        q = study_sub.add_parser(name, help=help_text)
        q.add_argument("spec", help="study YAML, e.g. experiments/quickstart.yaml")
        q.add_argument("--smoke-test", action="store_true",
                       help="shrink data, model, depths and seeds to a minutes-long run")
        q.add_argument("--retry-failed", action="store_true",
                       help="also re-run cells whose status is not ok")
        q.add_argument("--output-dir", help="override the spec's output_dir")
        q.add_argument("--storage-path", help="override the spec's storage_path (Ray Tune "
                                              "state): a path or an s3:// / gs:// URI")
        q.add_argument("--shared-storage", action="store_true",
                       help="output_dir is one shared mount (e.g. NFS) on every node")
        q.add_argument("--mlflow-tracking-uri", help="override the spec and MLFLOW_TRACKING_URI")
        q.add_argument("--no-report", action="store_true",
                       help="skip building STUDY/report (malloc-ray report builds it later)")
        q.set_defaults(func=_cmd_study)


def _cmd_study(args) -> int:
    from malloc_ray.study.run import StudyStopped, run_study
    from malloc_ray.study.spec import load_spec
    from malloc_ray.study.tracking import resolve_tracking_uri

    spec = load_spec(args.spec)
    if args.output_dir:
        spec.output_dir = args.output_dir
    if args.storage_path:
        spec.storage_path = args.storage_path
    if args.shared_storage:
        spec.shared_storage = True
    if args.mlflow_tracking_uri:
        spec.mlflow_tracking_uri = args.mlflow_tracking_uri
    if args.smoke_test:
        from malloc_ray import smoke

        spec.name = smoke.study_name(spec.name)
    try:
        table = run_study(spec, smoke_test=args.smoke_test, retry_failed=args.retry_failed)
    except StudyStopped as exc:
        print(f"malloc-ray: {exc}", file=sys.stderr)
        return 130  # the shell's code for a run stopped by SIGINT
    cols = ["dataset", "method", "depth", "seed", "status", "auc", "gauc", "logloss",
            "kv_bytes_per_user", "kv_payload_bytes_per_user", "macs_per_request"]
    print(table[cols].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    metrics = ["trial_id", *cols, "best_epoch", "train_seconds", "samples_per_second"]
    print("\nmetrics JSON:\n" + table[metrics].to_json(orient="records", indent=1))
    tracking = resolve_tracking_uri(spec.mlflow_tracking_uri, spec.study_dir)
    if not args.no_report:
        from malloc_ray.report import build_report

        report = build_report(spec.study_dir, tracking_uri=tracking,
                              say=lambda msg: print(msg, file=sys.stderr)).html
        print(f"\nreport:       {report}")
    print(f"\ntrials table: {spec.study_dir / 'trials.parquet'}\n"
          f"MLflow UI:    mlflow ui --backend-store-uri {tracking} --host 127.0.0.1 --port 5000"
          f"\n              then open http://127.0.0.1:5000")
    return 0


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="tables, figures and report.html of a finished study, "
                                      "from its trials table (no re-training)")
    p.add_argument("study_dir", metavar="STUDY", help="the study directory, e.g. runs/quickstart")
    p.add_argument("--mlflow-tracking-uri", help="where the study's runs are (default: the one "
                                                 "recorded in STUDY/study.json)")
    p.add_argument("--no-mlflow", action="store_true",
                   help="leave MLflow alone: build from STUDY/trials.parquet (else the "
                        "result files), log nothing (e.g. a study copied without its store)")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    from malloc_ray.report import build_report

    report = build_report(args.study_dir, tracking_uri=args.mlflow_tracking_uri,
                          log_to_mlflow=not args.no_mlflow,
                          say=lambda msg: print(msg, file=sys.stderr))
    print(json.dumps({"html": str(report.html), "figures": [str(p) for p in report.figures],
                      "tables": [str(p) for p in report.tables],
                      "mlflow_run_id": report.mlflow_run_id,
                      "seconds": round(report.seconds, 2)}, indent=2))
    return 0


def _cost_parser(sub) -> None:
    p = sub.add_parser("cost", help="MACs per request and bytes per user (total, then payload "
                                    "only) of every method at the paper's scale (Table 3)")
    p.add_argument("--profile", choices=["kuaivideo", "amazon"], default="kuaivideo",
                   help="sequence length: kuaivideo L=1024, amazon L=128")
    p.add_argument("--paper-compat", action="store_true",
                   help="also print the paper-compatible counters and the paper's Table 3")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_cost)


def _cmd_cost(args) -> int:
    from malloc_ray.metrics.cost import cost_table

    rows = cost_table(args.profile, args.paper_compat)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0

    def mib(x):
        return "-" if x is None else f"{x / 2**20:.2f}"

    def gmacs(x):
        return "-" if x is None else f"{x / 1e9:.4g}"

    # Total (payload + metadata) is the headline: it is what a server keeps per user. Payload
    # alone comes second; the paper's Table 3 (and so the paper-compat column) counts only it.
    compat = "paper-compat MiB (payload, paper's convention)"
    head = (f"{'method':11s} {'category':12s} {'workflow':9s} {'GMACs':>9s} {'total MiB':>9s} "
            f"{'payload MiB':>11s} {'shared MiB':>10s}")
    if args.paper_compat:
        head += f" | {'compat GMACs':>12s} {compat} | {'paper GMACs':>11s} {'paper MiB':>9s}"
    print(f"profile {args.profile}: 32 layers, d=256, 8 heads; ours = principled closed forms "
          "(primary)")
    print("total MiB = everything kept per user (payload + metadata: residuals, scales, "
          "positions); payload MiB = payload only")
    print("shared MiB = kept once per model for all users (CollectiveKV's KV pool): fleet "
          "memory = shared + users x total")
    print(head)
    for r in rows:
        line = (f"{r['method']:11s} {r['category']:12s} {r['workflow']:9s} "
                f"{gmacs(r['macs_per_request']):>9s} {mib(r['kv_bytes_per_user']):>9s} "
                f"{mib(r['kv_payload_bytes_per_user']):>11s} {mib(r['shared_bytes']):>10s}")
        if args.paper_compat:
            paper_mib = "-" if r["paper_mib"] is None else f"{r['paper_mib']:.2f}"
            line += (f" | {gmacs(r['paper_compat_macs']):>12s} "
                     f"{mib(r['paper_compat_bytes']):>{len(compat)}s}"
                     f" | {gmacs(r['paper_macs']):>11s} {paper_mib:>9s}")
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from malloc_ray.data import commands as data_commands

    parser = argparse.ArgumentParser(prog="malloc-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    data_commands.register(sub)
    _train_parser(sub)
    _methods_parser(sub)
    _baseline_parser(sub)
    _study_parser(sub)
    _cost_parser(sub)
    _report_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        print(f"malloc-ray: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
