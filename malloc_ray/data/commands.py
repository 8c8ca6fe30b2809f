"""`malloc-ray data prepare|stats`: argument parsing over `malloc_ray.data.prepare`.

`register(subparsers)` adds the commands; each leaf sets `func(args) -> int`. InputError is
left to the main CLI, which prints it and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from malloc_ray.data import prepare as prep
from malloc_ray.data.sources import PROFILES
from malloc_ray.data.sources.reczoo import X1_FILES
from malloc_ray.data.sources.reczoo_x2 import X2_FILES


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare datasets and show their statistics")
    sub = data.add_subparsers(dest="data_command", required=True)
    _prepare_parser(sub)
    stats = sub.add_parser("stats", help="print the Table 1 row of prepared datasets")
    stats.add_argument("dirs", nargs="+", metavar="DIR", help="dataset directory")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(func=_cmd_stats)


def _prepare_parser(sub) -> None:
    prepare = sub.add_parser("prepare", help="build a dataset directory from a source")
    sources = prepare.add_subparsers(dest="source", required=True)

    syn = sources.add_parser("synthetic", help="synthetic log with a paper profile")
    syn.add_argument("--profile", choices=sorted(PROFILES), default="kuaivideo")
    syn.add_argument("--users", type=int, default=500)
    syn.add_argument("--max-len", type=int, dest="max_len",
                     help="cap sequence lengths; scales the profile's lengths down to it")
    syn.add_argument("--items", type=int, default=100, help="item vocabulary size")
    syn.add_argument("--categories", type=int, default=50,
                     help="item i belongs to category (i - 1) mod categories")
    syn.add_argument("--seed", type=int, default=0)
    _common(syn)
    syn.set_defaults(func=_cmd_prepare, options=("profile", "users", "max_len", "items",
                                                 "categories", "seed"))

    log = sources.add_parser("interactions", help="CSV/TSV/parquet log: user,item,time,label")
    log.add_argument("path", metavar="FILE")
    log.add_argument("--user-col", dest="user_col", default="user")
    log.add_argument("--item-col", dest="item_col", default="item")
    log.add_argument("--time-col", dest="time_col", default="timestamp")
    log.add_argument("--label-col", dest="label_col", default="label",
                     help="0/1 label column (ignored with --rating-col)")
    log.add_argument("--rating-col", dest="rating_col",
                     help="derive label = rating >= --rating-threshold")
    log.add_argument("--rating-threshold", type=float, dest="rating_threshold")
    log.add_argument("--delimiter", help="CSV delimiter (default: tab for .tsv, else comma)")
    _common(log)
    log.set_defaults(func=_cmd_prepare, options=(
        "path", "user_col", "item_col", "time_col", "label_col", "rating_col",
        "rating_threshold", "delimiter"))

    ml = sources.add_parser("movielens", help="RecBole .inter file (e.g. ml-100k.inter)")
    ml.add_argument("path", metavar="FILE")
    ml.add_argument("--rating-threshold", type=float, dest="rating_threshold", default=4.0)
    _common(ml)
    ml.set_defaults(func=_cmd_prepare, options=("path", "rating_threshold"))

    seq = sources.add_parser("sequences", help="item-sequence file, one user per line: "
                                               "'user item_1 ... item_n' (S3-Rec/ICLRec)")
    seq.add_argument("path", metavar="FILE")
    seq.add_argument("--negatives", type=int, default=1,
                     help="sampled negatives per positive, scored as candidates that never "
                          "enter the history (default: %(default)s)")
    seq.add_argument("--seed", type=int, default=0, help="seed of the negative sampling")
    _common(seq)
    seq.set_defaults(func=_cmd_prepare, options=("path", "negatives", "seed"))
    _reczoo_parsers(sources)


def _reczoo_parsers(sources) -> None:
    """The reczoo benchmark layouts (docs/data.md, "reczoo datasets")."""
    x1 = {"kuaivideo_x1": "KuaiVideo_x1", "microvideo_x1": "MicroVideo1.7M_x1",
          "amazon_x1": "AmazonElectronics_x1"}
    for source, name in x1.items():
        p = sources.add_parser(source, help=f"reczoo {name} CSVs (train.csv + test.csv)")
        p.add_argument("path", metavar="PATH", help=f"the {name} directory, or one CSV file")
        p.add_argument("--files", nargs="+", default=list(X1_FILES), metavar="NAME",
                       help="CSV files to read inside the directory, in this order "
                            "(default: %(default)s)")
        _common(p)
        p.set_defaults(func=_cmd_prepare, options=("path", "files"))
    x2 = sources.add_parser("longctr_x2", help="reczoo/LongCTR _x2 parquet directory "
                                               "(KuaiVideo_x2, MicroVideo1.7M_x2)")
    x2.add_argument("path", metavar="DIR", help="directory with user_info.parquet and the "
                                                "impression files")
    x2.add_argument("--files", nargs="+", default=list(X2_FILES), metavar="NAME",
                    help="impression files, in this order (default: %(default)s)")
    x2.add_argument("--label", default="is_click", help="0/1 label column")
    _common(x2)
    x2.set_defaults(func=_cmd_prepare, options=("path", "files", "label"))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    p.add_argument("--max-seq-len", type=int, dest="max_seq_len",
                   help="keep each user's most recent N interactions")
    p.add_argument("--drop-short-users", action="store_true", dest="drop_short_users",
                   help="drop users with fewer than 3 interactions instead of failing")
    p.add_argument("--name", help="dataset name (default: profile, file or directory name)")
    p.add_argument("--strict", action="store_true",
                   help="fail (write nothing) when the label stream alone predicts the valid "
                        "targets (label_stream_auc > 0.60) instead of warning")


def _cmd_prepare(args) -> int:
    options = {k: getattr(args, k) for k in args.options}
    if args.source == "interactions" and args.rating_col is not None:
        options["label_col"] = None
    meta = prep.prepare(args.source, args.out, overwrite=args.overwrite,
                        max_seq_len=args.max_seq_len, drop_short_users=args.drop_short_users,
                        name=args.name, progress=lambda msg: print(msg, file=sys.stderr),
                        strict=args.strict, **options)
    print(json.dumps({"name": meta["name"], "dataset_id": meta["dataset_id"],
                      **meta["stats"], "splits": meta["splits"],
                      "dropped_users": meta["dropped_users"]}, indent=2))
    return 0


def _cmd_stats(args) -> int:
    rows = [prep.dataset_stats(d) for d in args.dirs]
    if args.json:  # one DIR: its row; several: a list of rows
        print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2))
    else:
        print(prep.format_stats(rows))
    return 0
