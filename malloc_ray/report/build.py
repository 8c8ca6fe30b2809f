"""`malloc-ray report STUDY_DIR`: tables, figures and `report.html` from the trials table alone.

Nothing is re-trained or re-evaluated: everything comes from `trials.parquet` (rebuilt from the
result files, else the MLflow child runs, if the file is gone) and `study.json` (provenance written when the study ran).
Output goes to `<study>/report/` — written to a temporary directory and swapped in, so a failed
report never leaves a half-written one — and is logged under `report/` on the study's MLflow
parent run.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from malloc_ray.errors import InputError
from malloc_ray.report import figures, headline, page, tables
from malloc_ray.study import pareto, provenance
from malloc_ray.study.results import load_table, table_path
from malloc_ray.study.tracking import (ROLE_TAG, artifact_root_missing, log_study_summary,
                                       open_study_store, store_exists, study_tracking_uri)

MLFLOW_UI = "http://127.0.0.1:5000"


@dataclass
class Report:
    directory: Path
    html: Path
    figures: list[Path]
    tables: list[Path]
    failure_marks: list[dict]
    mlflow_run_id: str | None
    seconds: float


def _provenance(study_dir: Path) -> dict:
    info = provenance.read(study_dir)
    if info is not None:
        return info
    # Studies run before provenance was recorded: say so, and describe the report's machine.
    return {"name": study_dir.name, "created_at": None,
            "command": "(study.json missing: code and environment below are the report's)",
            "code": provenance.code_info(), "versions": provenance.versions(),
            "hardware": provenance.hardware(), "protocol": provenance.PROTOCOL, "mlflow": {}}


def _load(study_dir: Path, info: dict, tracking_uri: str | None) -> pd.DataFrame:
    """`tracking_uri`: the study's store as it is now (`study_tracking_uri`), None with
    --no-mlflow (the table, else the result files; MLflow is never opened)."""
    experiment = (info.get("mlflow") or {}).get("experiment") or info["name"]
    try:
        table = load_table(study_dir, tracking_uri, experiment)
    except FileNotFoundError:
        raise InputError("no trials table, no result files and no MLflow store to rebuild it "
                         "from; run the study first (malloc-ray study run SPEC)",
                         file=str(table_path(study_dir))) from None
    if table.empty:
        raise InputError("the trials table has no rows", file=str(table_path(study_dir)))
    return table


def _write_tables(out: Path, all_tables: list[tables.Table]) -> list[Path]:
    written = []
    for t in all_tables:
        csv, md = out / "tables" / f"{t.name}.csv", out / "tables" / f"{t.name}.md"
        t.raw.to_csv(csv, index=False)
        md.write_text(t.markdown())
        written += [csv, md]
    return written


def _seed_caption(summary: pd.DataFrame) -> str:
    """How many ok seeds stand behind the points, for the figure captions."""
    n = summary.loc[summary["n_ok"] > 0, "n_ok"]
    if n.empty:
        return "No point has an ok seed."
    span = f"{int(n.min())}" if n.min() == n.max() else f"{int(n.min())}–{int(n.max())}"
    return (f"Each point: mean over {span} ok seed(s) (n= in its label); error bars: 95% CI "
            "(none with one seed).")


def _sections(table, info, figs, all_t, failure_marks, findings, summary) -> list:
    t2, t3, t3p, t4, fail, failed, front, front_d, ds_table, depth = all_t
    seeds = _seed_caption(summary)
    datasets = sorted(table["dataset"].unique())
    mark_text = "; ".join(f"{m['dataset']}/{m['method']}@depth {m['depth']}: {m['statuses']}"
                          for m in failure_marks) or "none"
    conv = "".join(page.figure_html(figs[f"convergence_{ds}"], f"Convergence curves — {ds}")
                   for ds in datasets)
    return [
        ("findings", "Findings", headline.findings_html(findings)),
        ("table2", "Accuracy (Table 2)", page.tables_html(t2)),
        ("table3", "Cost (Table 3)", page.tables_html([t3, *t3p])),
        ("table4", "Methods (Table 4)", page.tables_html([t4])),
        ("fig4", "Trade-off (Figure 4)",
         page.figure_html(figs["fig4_gauc_macs"], "GAUC vs MACs per request (log); bubble "
                          "area ∝ bytes per user (payload + metadata); faded points are "
                          f"dominated; the line is the GAUC × MACs Pareto front. {seeds}")
         + page.figure_html(figs["pareto_gauc_bytes"], "GAUC vs bytes per user (payload + "
                            "metadata); the line is the GAUC × bytes Pareto front. "
                            f"{seeds}")),
        ("pareto", "Pareto fronts", page.tables_html([front, front_d])),
        ("fig5", "Depth scaling (Figure 5)",
         page.figure_html(figs["fig5_depth"], "GAUC and Logloss vs depth, mean ± 95% CI over "
                          f"ok seeds; red ✗ = failed seed(s). Marked: {mark_text}. {seeds}")
         + page.tables_html([depth])),
        ("convergence", "Convergence", conv),
        ("failures", "Failures", page.tables_html([fail, failed])),
        ("reproducibility", "Reproducibility", page.repro_html(info, ds_table)),
    ]


def build_report(study_dir: str | Path, tracking_uri: str | None = None,
                 log_to_mlflow: bool = True, say=print) -> Report:
    start = time.perf_counter()
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise InputError("no such study directory", file=str(study_dir))
    info = _provenance(study_dir)
    # The store as the study directory is now (a moved study finds its own mlflow.db; a
    # missing store is an error, never created); None with --no-mlflow.
    tracking_uri = study_tracking_uri(study_dir, info, tracking_uri) if log_to_mlflow else None
    if tracking_uri is not None and not (table_path(study_dir).exists() or store_exists(
            tracking_uri) or (study_dir / "trials").is_dir()):
        tracking_uri = None  # no study here at all: _load says so, and no store is created
    if tracking_uri is not None:
        open_study_store(tracking_uri, study_dir)
    table = _load(study_dir, info, tracking_uri)
    say(f"report: {len(table)} trials from {table_path(study_dir)}")
    summary = pareto.pareto_table(table)
    per_depth = pareto.pareto_table(table, per_depth=True)
    # Baseline rows (a spec's `baselines`) are in the accuracy table, the findings, the
    # failure counts and summary.csv; cost tables, fronts and figures are the methods'.
    m_table, m_summary = table[~pareto.is_baseline(table)], summary[~pareto.is_baseline(summary)]
    m_per_depth = per_depth[~pareto.is_baseline(per_depth)]
    mlflow_info = info.get("mlflow") or {}
    methods = sorted(m_table["method"].unique())
    all_t = (tables.table2(summary), tables.table3(m_table, m_summary),
             tables.table3_paper_scale(methods), tables.table4(methods),
             tables.failure_counts(table),
             tables.failed_list(pareto.failed_cells(table), MLFLOW_UI,
                                mlflow_info.get("experiment_id")),
             tables.pareto(m_summary, per_depth=False),
             tables.pareto(m_per_depth, per_depth=True), tables.datasets(info),
             tables.depth_effect(m_table, m_summary))

    final = study_dir / "report"
    tmp = study_dir / f".report-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "figures").mkdir(parents=True)
    (tmp / "tables").mkdir()
    try:
        flat = [*all_t[0], all_t[1], *all_t[2], *all_t[3:]]
        table_files = _write_tables(tmp, flat)
        say("report: drawing figures")
        figs = _figures(m_table, m_summary, tmp / "figures")
        fig_paths = {k: v for k, v in figs.items() if k != "_marks"}
        findings = headline.dataset_findings(summary, info)
        (tmp / "findings.md").write_text(headline.findings_markdown(findings))
        sections = _sections(m_table, info, fig_paths, all_t, figs["_marks"], findings,
                             m_summary)
        subtitle = (f"{len(table)} trials · {table['dataset'].nunique()} dataset(s) · "
                    f"{len(methods)} method(s) · depths {sorted(table['depth'].unique().tolist())}"
                    + (f" · {len(table) - len(m_table)} baseline row(s)"
                       if len(table) > len(m_table) else "")
                    + f" · built {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from the "
                    "trials table")
        (tmp / "report.html").write_text(page.render(f"malloc-ray study: {info['name']}",
                                                     subtitle, sections))
        (tmp / "summary.csv").write_text(summary.to_csv(index=False))
        _swap(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rel = lambda p: final / p.relative_to(tmp)  # noqa: E731 - paths after the swap
    run_id = _log_to_mlflow(final, info, study_dir, tracking_uri, say, m_summary, [
        rel(fig_paths[k]) for k in ("fig4_gauc_macs", "pareto_gauc_bytes")]) \
        if log_to_mlflow else None
    report = Report(final, final / "report.html", [rel(p) for p in fig_paths.values()],
                    [rel(p) for p in table_files], figs["_marks"], run_id,
                    time.perf_counter() - start)
    say(f"report: {report.html} ({report.seconds:.1f}s)")
    return report


def _figures(table: pd.DataFrame, summary: pd.DataFrame, out: Path) -> dict:
    figs = {"fig4_gauc_macs": figures.tradeoff(summary, out / "fig4_gauc_macs.png"),
            "pareto_gauc_bytes": figures.tradeoff(summary, out / "pareto_gauc_bytes.png",
                                                  x="kv_bytes_per_user",
                                                  front="front_gauc_bytes", bubbles=False)}
    figs["fig5_depth"], figs["_marks"] = figures.depth_scaling(summary, out / "fig5_depth.png")
    for ds in sorted(table["dataset"].unique()):
        figs[f"convergence_{ds}"] = figures.convergence(table, ds, out / f"convergence_{ds}.png")
    return figs


def _swap(tmp: Path, final: Path) -> None:
    old = final.with_name(f".report-old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _log_to_mlflow(final: Path, info: dict, study_dir: Path, tracking_uri: str | None,
                   say, summary: pd.DataFrame | None = None, pareto_figures=()) -> str | None:
    """Log the report under `report/` on the study's parent run (found by id or by tag), and
    the trade-off summary as its table and the Pareto figures as images
    (`tracking.log_study_summary`), where the MLflow UI shows them."""
    from mlflow.tracking import MlflowClient

    mlflow_info = info.get("mlflow") or {}
    uri = tracking_uri or study_tracking_uri(study_dir, info)
    client = MlflowClient(uri)
    run_id = mlflow_info.get("parent_run_id")
    if run_id is None:
        experiment = client.get_experiment_by_name(mlflow_info.get("experiment") or info["name"])
        parents = [] if experiment is None else client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'study'",
            max_results=1)
        if not parents:
            say(f"report: no MLflow parent run found in {uri}; artifacts not logged")
            return None
        run_id = parents[0].info.run_id
    missing = artifact_root_missing(client, run_id, study_dir)
    if missing:
        say(f"report: the artifact location {missing} of MLflow run {run_id} does not exist; "
            "artifacts not logged")
        return None
    client.log_artifacts(run_id, str(final), artifact_path="report")
    if summary is not None:
        log_study_summary(client, run_id, summary, pareto_figures)
    say(f"report: logged as artifacts of MLflow run {run_id} (report/)")
    return run_id
