"""The report's first section: per dataset, what the study found, in generated sentences.

Each sentence carries its uncertainty (paired ΔGAUC vs Native ± 95% half-width, seed count) and
its verdict; differences inside the noise are said to be "≈ Native". A dataset where Native did
not learn opens with a banner instead: the study measured no method on it. The label-stream
audit of the dataset is quoted so a reader sees at once whether its AUCs can be trusted.
A study that ran baselines (its spec's `baselines`) gets one more sentence per dataset (and
Native depth): Native's test AUC with its 95% interval against each baseline's test AUC, and
whether that interval lies entirely above it.
"""

from __future__ import annotations

import html

import pandas as pd

from malloc_ray.study import provenance, stats
from malloc_ray.study.pareto import is_baseline, native_learned


def _method_phrase(row) -> str:
    d, h, n = row["delta_gauc_vs_native"], row["delta_gauc_vs_native_ci95"], \
        row["n_pairs_vs_native"]
    v = row["verdict_vs_native"]
    if v == "n/a":
        why = "a single seed pair" if n == 1 else "no seed pair with Native"
        return f"{row['label']}: no verdict ({why})"
    words = {"better": "better than Native", "worse": "worse than Native", "≈": "≈ Native"}[v]
    return f"{row['label']} {words} (ΔGAUC {d:+.4f} ± {h:.4f}, {int(n)} seeds)"


def _depth_sentence(part: pd.DataFrame, depth) -> str:
    native = part[part["method"] == stats.NATIVE]
    if native.empty or not (native["n_ok"] > 0).any():
        return f"Depth {depth}: Native did not learn, so no method is compared."
    nat = native.iloc[0]
    lead = (f"Depth {depth}: Native test GAUC "
            f"{stats.fmt_interval(nat['gauc'], nat['gauc_ci95'], nat['n_ok'])}")
    others = part[(part["method"] != stats.NATIVE) & ~is_baseline(part)]
    learned = others[others["n_ok"] > 0]
    # findings first: a reader skimming the line sees the verdicts that are not "≈"
    order = learned.assign(_k=learned["verdict_vs_native"].map(
        {"better": 0, "worse": 1, "≈": 2, "n/a": 3})).sort_values(["_k", "label"])
    phrases = [_method_phrase(r) for _, r in order.iterrows()]
    failed = others[others["n_ok"] == 0]
    if len(failed):
        phrases.append("no ok seed (not compared): " + ", ".join(
            f"{r['label']} ({r['failed_statuses']})" for _, r in failed.iterrows()))
    return lead + (". " + "; ".join(phrases) if phrases else "") + "."


def _baseline_phrase(nat, base) -> str:
    auc, half = nat["auc"], nat["auc_ci95"]
    ref = base["auc"]
    if base["n_ok"] == 0 or ref != ref:
        return f"{base['label']} did not run ({base['failed_statuses'] or 'no result'})"
    if half != half:
        where = "above" if auc > ref else "not above"
        return (f"{base['label']} {ref:.4f} (Native {where} it, but with no interval: "
                "not established)")
    if auc - half > ref:
        where = "Native's CI entirely above it"
    elif auc + half < ref:
        where = "Native's CI entirely below it"
    else:
        where = "Native's CI not entirely above it (overlaps)"
    return f"{base['label']} {ref:.4f} ({where})"


def _baseline_sentences(part: pd.DataFrame) -> list[str]:
    """Per Native depth: Native's test AUC ± 95% CI vs each baseline's test AUC."""
    baselines = part[is_baseline(part)].sort_values("label")
    native = part[(part["method"] == stats.NATIVE) & (part["n_ok"] > 0)]
    if baselines.empty or native.empty:
        return []
    several = native["depth"].nunique() > 1
    out = []
    for _, nat in native.sort_values("depth").iterrows():
        at = f" at depth {nat['depth']}" if several else ""
        out.append(f"Baselines (test AUC): Native{at} "
                   f"{stats.fmt_interval(nat['auc'], nat['auc_ci95'], nat['n_ok'])} vs "
                   + "; ".join(_baseline_phrase(nat, b) for _, b in baselines.iterrows()) + ".")
    return out


def dataset_findings(summary: pd.DataFrame, info: dict) -> list[dict]:
    """Per dataset: {dataset, learned, banner, sentences, label_stream_auc, evaluation}."""
    learned = native_learned(summary)
    evaluation = evaluation_words(info)
    recorded = info.get("datasets") or {}
    out = []
    for ds in sorted(summary["dataset"].unique()):
        part = summary[summary["dataset"] == ds]
        audit = provenance.label_stream_auc((recorded.get(ds) or {}).get("stats"))
        banner = None if learned[ds] else (
            f"Native did not learn on {ds} (no seed reached the no-learning margin above "
            f"AUC 0.5): the study measured no method on this dataset, and no Δ is shown.")
        methods = part[~is_baseline(part)]
        sentences = [] if banner else [_depth_sentence(p, depth)
                                       for depth, p in methods.groupby("depth", sort=True)]
        if not banner:
            sentences += _baseline_sentences(part)
        out.append({"dataset": ds, "learned": learned[ds], "banner": banner,
                    "sentences": sentences, "label_stream_auc": audit,
                    "evaluation": evaluation})
    return out


EVALUATION = {
    "window": "window protocol: every target scored from a fresh window of its history",
    "stream": "stream protocol: per user one prefill, then each target scored and appended "
              "in time order, as a server does",
}


def evaluation_words(info: dict) -> str:
    """How the study's targets were scored (study.json `eval_protocol`; window if older)."""
    return "Evaluation: " + EVALUATION.get(info.get("eval_protocol") or "window",
                                           str(info.get("eval_protocol")))


def findings_html(findings: list[dict]) -> str:
    parts = []
    for f in findings:
        audit = provenance.fmt_label_stream_auc(f["label_stream_auc"])
        leak = (f["label_stream_auc"] is not None
                and f["label_stream_auc"] > provenance.LABEL_STREAM_LEAK)
        body = (f'<p class="banner" data-banner="{html.escape(f["dataset"])}">'
                f'{html.escape(f["banner"])}</p>' if f["banner"] else
                "".join(f"<p>{html.escape(s)}</p>" for s in f["sentences"]))
        parts.append(
            f'<div class="finding" data-dataset="{html.escape(f["dataset"])}">'
            f"<h3>{html.escape(f['dataset'])}</h3>{body}"
            f'<p class="note">Label-stream AUC {html.escape(audit)}'
            + (" — above the leak threshold: the label stream alone predicts the target."
               if leak else "") + f'</p><p class="note">{html.escape(f["evaluation"])}</p>'
            "</div>")
    return "".join(parts)


def findings_markdown(findings: list[dict]) -> str:
    lines = ["## Findings", ""]
    for f in findings:
        lines += [f"### {f['dataset']}", ""]
        lines += [f"> **{f['banner']}**"] if f["banner"] else f["sentences"]
        lines += ["", f"Label-stream AUC: {provenance.fmt_label_stream_auc(f['label_stream_auc'])}",
                  "", f["evaluation"], ""]
    return "\n".join(lines)
