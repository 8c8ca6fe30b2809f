"""The report's tables, computed from the trials table: the paper's Tables 2-4 analogs, the
failure table and the Pareto table. Each is a `Table`: display strings, a bold mask (best cells)
and the raw numbers written to CSV.
"""

from __future__ import annotations

import ast
import html
import inspect
import io
import textwrap
import tokenize
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from malloc_ray.study import provenance, stats
from malloc_ray.study.pareto import FRONTS, is_baseline, native_learned

STATUSES = ("ok", "diverged", "no_learning", "oom", "error")
NATIVE = "native"
BYTES_TOTAL, BYTES_PAYLOAD = "bytes / user (total)", "bytes / user (payload only)"
BYTES_NOTE = ("Bytes / user (total) is everything a server keeps for the user, payload and "
              "metadata (residual windows, pivots, quantizer scales, kept positions, validity "
              "flags): the headline, used by the Pareto fronts. Payload only is the paper's "
              "convention, shown beside it.")


@dataclass
class Table:
    name: str                  # file stem: tables/<name>.csv and .md
    title: str
    display: pd.DataFrame      # strings, as shown
    raw: pd.DataFrame          # numbers, as written to CSV
    bold: pd.DataFrame | None = None
    note: str = ""
    links: dict = field(default_factory=dict)  # (row, col) -> URL

    def is_bold(self, i: int, col: str) -> bool:
        return self.bold is not None and col in self.bold and bool(self.bold.iloc[i][col])

    def markdown(self) -> str:
        cols = list(self.display.columns)
        lines = [f"### {self.title}", "", "| " + " | ".join(cols) + " |",
                 "|" + "|".join("---" for _ in cols) + "|"]
        for i in range(len(self.display)):
            cells = [str(self.display.iloc[i][c]) for c in cols]
            cells = [f"**{v}**" if self.is_bold(i, c) else v for v, c in zip(cells, cols)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines + ([""] + [self.note] if self.note else []) + [""])

    def html(self) -> str:
        cols = list(self.display.columns)
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
        body = []
        for i in range(len(self.display)):
            cells = []
            for c in cols:
                text = html.escape(str(self.display.iloc[i][c]))
                if (i, c) in self.links:
                    text = f'<a href="{html.escape(self.links[(i, c)])}">{text}</a>'
                cells.append(f"<td><b>{text}</b></td>" if self.is_bold(i, c) else f"<td>{text}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        note = f'<p class="note">{html.escape(self.note)}</p>' if self.note else ""
        return (f'<table class="data" data-table="{self.name}"><thead><tr>{head}</tr></thead>'
                f"<tbody>{''.join(body)}</tbody></table>{note}")


# -- formatting --------------------------------------------------------------------------------
def fmt_mean_std(mean, std, digits=4) -> str:
    if mean is None or pd.isna(mean):
        return "–"
    if std is None or pd.isna(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def fmt_count(x) -> str:
    if x is None or pd.isna(x):
        return "–"
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g}"


def fmt_bytes(x) -> str:
    if x is None or pd.isna(x):
        return "–"
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{int(x)} B"


def _failed_suffix(row) -> str:
    return f" ({row['n_failed']}/{row['n_seeds']} failed: {row['failed_statuses']})" \
        if row["n_failed"] else ""


# -- Table 2: accuracy -------------------------------------------------------------------------
TABLE2_NOTE = ("Test metrics at the best-valid-AUC epoch over the seeds with status ok: mean ± "
               "half-width of the t-based 95% confidence interval (1 seed: no interval). "
               "ΔGAUC vs native is paired by seed (same dataset, depth and seed), with its own "
               "95% interval; better / worse only when that interval excludes 0, else ≈. Bold: "
               "best in its column, only when its interval does not overlap the runner-up's.")
BASELINE_NOTE = ("Baselines (the study's `baselines`: popularity, cooc, din, bst; "
                 "docs/baselines.md) are scored once per dataset on the same test samples; they "
                 "have no depth, so they are listed at every depth, below the methods, and are "
                 "never bold and never compared with Native as a method.")


def _fmt_ci(mean, half_width) -> str:
    if mean is None or pd.isna(mean):
        return "–"
    return f"{mean:.4f}" if pd.isna(half_width) else f"{mean:.4f} ± {half_width:.4f}"


def _fmt_delta(row) -> str:
    if row["method"] == NATIVE:
        return "reference"
    if row.get("category") == "baseline":
        return "baseline"
    return _fmt_paired(row["delta_gauc_vs_native"], row["delta_gauc_vs_native_ci95"],
                       row["verdict_vs_native"])


def _fmt_paired(d, h, verdict) -> str:
    """A paired difference with its interval and verdict; n/a without a pair or interval."""
    if pd.isna(d):
        return "n/a"
    if pd.isna(h):
        return f"{d:+.4f} (1 pair, n/a)"
    return f"{d:+.4f} ± {h:.4f} {verdict}"


def table2(summary: pd.DataFrame) -> list[Table]:
    """One table per depth: rows = methods, per dataset AUC, GAUC, Logloss (mean ± 95% CI over
    ok seeds), the seed count, and GAUC minus Native's paired by seed with its verdict — left
    out for a dataset where Native did not learn. Baseline rows (no depth) follow the methods
    in every depth's table, never bold and without a ΔGAUC."""
    learned = native_learned(summary)
    baselines = summary[is_baseline(summary)]
    names = sorted(baselines["label"].unique())
    out = []
    for depth, part in summary[~is_baseline(summary)].groupby("depth", sort=True):
        part = pd.concat([part, baselines.assign(depth=depth)], ignore_index=True)
        methods = sorted(set(part["label"]) - set(names), key=lambda m: (m != NATIVE, m)) + names
        ref = np.isin(methods, names)
        display = pd.DataFrame({"method": methods})
        raw = pd.DataFrame({"method": methods})
        bold = pd.DataFrame(False, index=range(len(methods)), columns=["method"])
        for ds, rows in part.groupby("dataset", sort=True):
            rows = rows.set_index("label").reindex(methods)
            for metric, best in (("auc", "max"), ("gauc", "max"), ("logloss", "min")):
                col = f"{ds} {metric.upper() if metric != 'logloss' else 'Logloss'}"
                means, cis = rows[metric].to_numpy(float), rows[f"{metric}_ci95"].to_numpy(float)
                display[col] = [_fmt_ci(m, h) for m, h in zip(means, cis)]
                raw[col], raw[col + " ci95"] = means, cis
                bold[col] = stats.separated_best(np.where(ref, np.nan, means), cis,
                                                 best == "max")
            display[f"{ds} seeds ok"] = [
                "–" if pd.isna(r["n_seeds"]) else f"{int(r['n_ok'])}/{int(r['n_seeds'])}"
                + ("" if not r["n_failed"] else f" ({r['failed_statuses']})")
                for _, r in rows.iterrows()]
            if learned.get(ds, False):
                col = f"{ds} ΔGAUC vs native"
                display[col] = [_fmt_delta({**r, "method": m}) for m, r in rows.iterrows()]
                raw[col] = rows["delta_gauc_vs_native"].to_numpy(float)
                raw[col + " ci95"] = rows["delta_gauc_vs_native_ci95"].to_numpy(float)
                raw[f"{ds} verdict vs native"] = rows["verdict_vs_native"].to_numpy()
        out.append(Table(f"table2_depth{depth}", f"Table 2 analog — accuracy at depth {depth}",
                         display, raw, bold,
                         note=TABLE2_NOTE + (" " + BASELINE_NOTE if names else "")))
    return out


# -- Figure 5 in numbers: depth ----------------------------------------------------------------
def depth_effect(table: pd.DataFrame, summary: pd.DataFrame) -> Table:
    """Per (dataset, method) and each depth above its shallowest: GAUC at both depths (mean ±
    95% CI over ok seeds) and their difference paired by seed, with its interval and verdict
    ("better": deeper scores higher beyond seed noise). Empty with one depth."""
    deltas = stats.depth_deltas(table, "gauc")
    keys = ["dataset", "method", "hparams", "depth"]
    gauc = summary.assign(hparams=summary["hparams"].fillna("{}")).set_index(keys)
    rows, display = [], []
    for _, d in deltas.sort_values(["dataset", "method", "depth"]).iterrows():
        deep = gauc.loc[(d["dataset"], d["method"], d["hparams"], d["depth"])]
        base = gauc.loc[(d["dataset"], d["method"], d["hparams"], d["base_depth"])]
        verdict = stats.verdict(d["delta"], d["delta_ci95"])
        rows.append({**d.to_dict(), "gauc": deep["gauc"], "gauc_ci95": deep["gauc_ci95"],
                     "base_gauc": base["gauc"], "base_gauc_ci95": base["gauc_ci95"],
                     "verdict": verdict})
        display.append({
            "dataset": d["dataset"], "method": deep["label"], "depth": str(d["depth"]),
            "GAUC": _fmt_ci(deep["gauc"], deep["gauc_ci95"]),
            "GAUC at the shallowest depth": f"{_fmt_ci(base['gauc'], base['gauc_ci95'])} "
                                            f"(depth {d['base_depth']})",
            "ΔGAUC (paired)": _fmt_paired(d["delta"], d["delta_ci95"], verdict),
            "pairs": str(int(d["n_pairs"]))})
    cols = ["dataset", "method", "depth", "GAUC", "GAUC at the shallowest depth",
            "ΔGAUC (paired)", "pairs"]
    return Table("depth_effect", "Depth (Figure 5 in numbers) — GAUC against the shallowest "
                 "depth", pd.DataFrame(display, columns=cols), pd.DataFrame(rows),
                 note="ΔGAUC is this depth's test GAUC minus the same method's at its "
                      "shallowest depth, paired by seed (the seed fixes the initialisation "
                      "and the batch order), with its own 95% interval; better / worse only "
                      "when that interval excludes 0, else ≈." if len(rows) else
                      "One depth only: nothing to compare.")


# -- Table 3: cost -----------------------------------------------------------------------------
def table3(table: pd.DataFrame, summary: pd.DataFrame) -> Table:
    """Measured cost at the study's own scale: MACs per request, bytes per user (total =
    payload + metadata, the headline; then payload only) counted from the tensors, measured
    peak memory and throughput."""
    keys = ["dataset", "method", "depth", "hparams"]
    table = table.assign(hparams=table["hparams"].fillna("{}"))
    extra = table.groupby(keys).agg(
        peak=("peak_memory_bytes", "max"), sps=("samples_per_second", "mean"),
        train_s=("train_seconds", "mean")).reset_index()
    df = summary.merge(extra, on=keys, how="left")
    df = df.sort_values(["dataset", "depth", "label"]).reset_index(drop=True)
    display = pd.DataFrame({
        "dataset": df["dataset"], "depth": df["depth"], "method": df["label"],
        "MACs / request": df["macs_per_request"].map(fmt_count),
        BYTES_TOTAL: df["kv_bytes_per_user"].map(fmt_bytes),
        BYTES_PAYLOAD: df["kv_payload_bytes_per_user"].map(fmt_bytes),
        "peak memory (measured)": df["peak"].map(fmt_bytes),
        "train samples/s": df["sps"].map(lambda v: "–" if pd.isna(v) else f"{v:.0f}"),
    })
    raw = df[["dataset", "depth", "method", "hparams", "macs_per_request", "kv_bytes_per_user",
              "kv_payload_bytes_per_user", "peak", "sps", "train_s"]]
    return Table("table3_measured", "Table 3 analog — cost at the study's scale (measured)",
                 display, raw,
                 note="MACs per request in closed form (cross-checked against "
                      "torch.utils.flop_counter in the tests); bytes counted from the memory "
                      f"tensors of one user. {BYTES_NOTE} Peak memory is the trial process's "
                      "peak (CPU RSS or CUDA allocator).")


def table3_paper_scale(methods: list[str]) -> list[Table]:
    """The same methods at the paper's scale (32 layers, d=256, 8 heads), ours beside the
    paper-compatible counters and the paper's printed Table 3."""
    from malloc_ray.metrics.cost import cost_table
    from malloc_ray.metrics.paper_compat import PROFILES

    out = []
    for profile, L in PROFILES.items():
        rows = [r for r in cost_table(profile, paper_compat=True) if r["method"] in methods]
        if not rows:
            continue
        raw = pd.DataFrame(rows)
        display = pd.DataFrame({
            "method": raw["method"],
            "MACs (ours)": raw["macs_per_request"].map(fmt_count),
            "bytes / user (total, ours)": raw["kv_bytes_per_user"].map(fmt_bytes),
            "bytes / user (payload only, ours)": raw["kv_payload_bytes_per_user"].map(fmt_bytes),
            "MACs (paper-compat)": raw["paper_compat_macs"].map(fmt_count),
            "MiB (paper-compat: payload, the paper's convention)": raw["paper_compat_bytes"].map(
                lambda b: "–" if b is None or pd.isna(b) else f"{b / 2**20:.2f}"),
            "MACs (paper)": raw["paper_macs"].map(fmt_count),
            "MiB (paper)": raw["paper_mib"].map(lambda v: "–" if v is None or pd.isna(v)
                                                else f"{v:.2f}"),
        })
        out.append(Table(f"table3_paper_{profile}",
                         f"Table 3 at the paper's scale — {profile} (L={L})", display, raw,
                         note="Ours: principled closed forms (primary), equal to the bytes "
                              "measured from real tensors (tests/test_cost_bytes.py). "
                              f"{BYTES_NOTE} Paper-compat: the counting conventions that "
                              "reproduce the printed table (docs/results.md), whose memory is "
                              "payload only; '–' where no formula fits."))
    return out


# -- Table 4: methods --------------------------------------------------------------------------
def code_lines(obj) -> int:
    """Lines of code of a class: non-blank, not comments, not docstrings."""
    source = textwrap.dedent(inspect.getsource(obj))
    doc_lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            doc_lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    code: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                            tokenize.DEDENT, tokenize.ENDMARKER):
            code.update(range(tok.start[0], tok.end[0] + 1))
    return len(code - doc_lines)


def table4(methods: list[str]) -> Table:
    from malloc_ray.methods import REGISTRY

    rows = []
    for name in methods:
        cls = REGISTRY.get(name)
        if cls is None:
            rows.append({"method": name, "category": "?", "workflow": "?", "lines of code": None,
                         "module": "(not registered in this version)"})
            continue
        rows.append({"method": name, "category": cls.category, "workflow": cls.workflow,
                     "lines of code": code_lines(cls), "module": cls.__module__})
    raw = pd.DataFrame(rows)
    display = raw.fillna("–").astype(str)
    return Table("table4_methods", "Table 4 analog — methods", display, raw,
                 note="Workflow: trained = trained with the method in place; post-hoc = applied "
                      "to the trained Native weights without a gradient step. Lines of code: the "
                      "method's class, without docstrings, comments and blank lines.")


# -- datasets ----------------------------------------------------------------------------------
DATASET_STATS = {"users": "users", "items": "items", "interactions": "interactions",
                 "max_length": "max length", "avg_length": "avg length",
                 "positive_rate": "positive rate"}
LABEL_STREAM = "label-stream AUC"


def datasets(info: dict) -> Table:
    """The study's datasets as study.json recorded them: id, Table 1 statistics and the
    label-stream audit, bold where the label stream leaks the target."""
    rows = [{"dataset": name, "dataset_id": d.get("dataset_id"),
             **{label: (d.get("stats") or {}).get(key) for key, label in DATASET_STATS.items()},
             LABEL_STREAM: provenance.label_stream_auc(d.get("stats"))}
            for name, d in sorted((info.get("datasets") or {}).items())]
    raw = pd.DataFrame(rows, columns=["dataset", "dataset_id", *DATASET_STATS.values(),
                                      LABEL_STREAM])
    raw[LABEL_STREAM] = pd.to_numeric(raw[LABEL_STREAM], errors="coerce").astype(float)
    display = raw.astype(object).where(raw.notna(), "–").astype(str)
    display[LABEL_STREAM] = raw[LABEL_STREAM].map(
        lambda v: provenance.fmt_label_stream_auc(None if pd.isna(v) else v))
    bold = pd.DataFrame(False, index=raw.index, columns=raw.columns)
    bold[LABEL_STREAM] = raw[LABEL_STREAM] > provenance.LABEL_STREAM_LEAK
    note = (f"{provenance.LABEL_STREAM_NOTE} Bold: above {provenance.LABEL_STREAM_LEAK:.2f}."
            if len(raw) else "No dataset provenance recorded (study.json missing).")
    return Table("datasets", "Datasets", display, raw, bold, note=note)


# -- failures ----------------------------------------------------------------------------------
def failure_counts(table: pd.DataFrame) -> Table:
    """method × depth × status counts over every cell (ok included, so nothing is hidden)."""
    counts = (table.groupby(["dataset", "method", "depth", "status"]).size()
              .unstack("status", fill_value=0))
    for status in STATUSES:
        if status not in counts:
            counts[status] = 0
    extra = [c for c in counts.columns if c not in STATUSES]
    raw = counts[list(STATUSES) + extra].reset_index()
    raw["failed"] = raw[[c for c in raw.columns if c in STATUSES[1:] or c in extra]].sum(axis=1)
    display = raw.astype(str)
    bold = pd.DataFrame(False, index=raw.index, columns=raw.columns)
    bold["failed"] = raw["failed"] > 0
    return Table("failures", "Failure table — cells per status", display, raw, bold,
                 note="Every cell of the study is counted here; failed cells are excluded from "
                      "means and Pareto fronts but never dropped.")


def failed_list(failed: pd.DataFrame, mlflow_ui: str | None, experiment_id: str | None) -> Table:
    display = failed.copy()
    display["reason"] = display["reason"].map(
        lambda r: "" if r is None or pd.isna(r) else str(r)[:160])
    display = display.astype(object).where(display.notna(), "–").astype(str)
    links = {}
    if mlflow_ui and experiment_id and "mlflow_run_id" in failed:
        col = list(display.columns).index("mlflow_run_id")
        for i, run_id in enumerate(failed["mlflow_run_id"]):
            if isinstance(run_id, str) and run_id:
                links[(i, display.columns[col])] = \
                    f"{mlflow_ui}/#/experiments/{experiment_id}/runs/{run_id}"
    return Table("failed_cells", "Failed cells", display, failed, links=links,
                 note="" if len(failed) else "No cell failed.")


# -- Pareto ------------------------------------------------------------------------------------
def pareto(summary: pd.DataFrame, per_depth: bool) -> Table:
    df = summary.sort_values(["dataset", "depth", "label"]).reset_index(drop=True)
    display = pd.DataFrame({
        "dataset": df["dataset"], "depth": df["depth"].astype(str), "method": df["label"],
        "GAUC": [fmt_mean_std(m, s) for m, s in zip(df["gauc"], df["gauc_std"])],
        "MACs": df["macs_per_request"].map(fmt_count),
        BYTES_TOTAL: df["kv_bytes_per_user"].map(fmt_bytes),
        "seeds ok": [f"{a}/{b}" for a, b in zip(df["n_ok"], df["n_seeds"])],
    })
    bold = pd.DataFrame(False, index=df.index, columns=display.columns)
    for name in FRONTS:
        display[f"front {name}"] = df[f"front_{name}"].map({True: "●", False: ""})
        bold[f"front {name}"] = df[f"front_{name}"]
    scope = "within each (dataset, depth)" if per_depth else "within each dataset, over all depths"
    return Table("pareto_per_depth" if per_depth else "pareto", f"Pareto fronts ({scope})",
                 display, df, bold,
                 note="● = non-dominated on seed means (GAUC ↑, MACs ↓, bytes ↓; bytes = "
                      "payload + metadata per user). Points without an ok seed are listed but "
                      "cannot be on a front.")
