"""The study report from a trials table alone: files, tables, failure marks, MLflow artifacts,
atomic output, and a rendering check in headless Chromium."""

import html.parser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
from scipy import stats as scipy_stats
import pytest

from malloc_ray.errors import InputError
from malloc_ray.report import build_report
from malloc_ray.study import provenance
from malloc_ray.study.tracking import default_tracking_uri, start_study_run
from report_fixtures import FAILURES, LABEL_STREAM_AUC, write_fake_study

SECTIONS = ("findings", "table2", "table3", "table4", "fig4", "pareto", "fig5", "convergence",
            "failures", "reproducibility")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    study_dir = tmp_path_factory.mktemp("study") / "fake"
    table = write_fake_study(study_dir, provenance=True)
    return build_report(study_dir, log_to_mlflow=False, say=lambda _: None), table


def test_report_writes_html_figures_and_tables(report):
    rep, table = report
    names = {p.name for p in rep.figures}
    assert {"fig4_gauc_macs.png", "fig5_depth.png", "pareto_gauc_bytes.png",
            "convergence_kuai.png", "convergence_amazon.png"} <= names
    for path in rep.figures:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    stems = {p.stem for p in rep.tables}
    assert {"table2_depth1", "table2_depth4", "table3_measured", "table4_methods", "failures",
            "failed_cells", "pareto", "pareto_per_depth"} <= stems
    page = rep.html.read_text()
    assert page.count("data:image/png;base64,") == len(rep.figures)  # self-contained
    assert "<link" not in page and 'src="http' not in page
    for anchor in SECTIONS:
        assert f'id="{anchor}"' in page


def test_datasets_show_the_label_stream_audit_or_na(report):
    rep, _ = report
    raw = pd.read_csv(rep.directory / "tables" / "datasets.csv").set_index("dataset")
    assert raw.loc["kuai", "label-stream AUC"] == pytest.approx(LABEL_STREAM_AUC["kuai"])
    assert pd.isna(raw.loc["amazon", "label-stream AUC"])  # meta.json without the key
    md = (rep.directory / "tables" / "datasets.md").read_text()
    assert "| label-stream AUC |" in md.splitlines()[2]
    assert "**0.6512**" in next(line for line in md.splitlines() if line.startswith("| kuai"))
    assert "| n/a |" in next(line for line in md.splitlines() if line.startswith("| amazon"))
    page = rep.html.read_text()
    assert "label-stream AUC" in page and "n/a" in page
    assert "sees only the previous labels and position parity" in page
    assert "above 0.60 the label stream leaks the target" in page


def test_table3_headline_bytes_are_payload_plus_metadata(report):
    rep, table = report
    t3 = pd.read_csv(rep.directory / "tables" / "table3_measured.csv")
    assert (t3["kv_bytes_per_user"] >= t3["kv_payload_bytes_per_user"]).all()
    assert (t3["kv_bytes_per_user"] > t3["kv_payload_bytes_per_user"]).any()
    head = (rep.directory / "tables" / "table3_measured.md").read_text().splitlines()[2]
    assert head.index("bytes / user (total)") < head.index("bytes / user (payload only)")
    paper = (rep.directory / "tables" / "table3_paper_kuaivideo.md").read_text()
    assert "paper-compat: payload, the paper's convention" in paper
    front = (rep.directory / "tables" / "pareto.md").read_text().splitlines()[2]
    assert "bytes / user (total)" in front


def test_results_from_before_the_total_headline_read_with_todays_meaning(tmp_path):
    from malloc_ray.study.results import build_table, load_table, table_path

    old = {"trial_id": "t", "dataset": "kuai", "method": "kivi", "depth": 1, "seed": 0,
           "status": "ok", "kv_bytes_per_user": 10, "kv_bytes_per_user_with_metadata": 25}
    row = build_table([old]).iloc[0]  # an old result file
    assert (row["kv_bytes_per_user"], row["kv_payload_bytes_per_user"]) == (25, 10)
    pd.DataFrame([old]).to_parquet(table_path(tmp_path))  # an old trials table
    row = load_table(tmp_path).iloc[0]
    assert (row["kv_bytes_per_user"], row["kv_payload_bytes_per_user"]) == (25, 10)


def test_table2_means_intervals_and_paired_delta_vs_native(report):
    rep, table = report
    t2 = pd.read_csv(rep.directory / "tables" / "table2_depth1.csv").set_index("method")
    ok = table[(table.status == "ok") & (table.depth == 1) & (table.dataset == "kuai")]
    means = ok.groupby("method")["gauc"].mean()
    for method, value in means.items():
        assert t2.loc[method, "kuai GAUC"] == pytest.approx(value)
    # independent of the report's code: scipy's paired t interval over the shared seeds
    pair = ok.pivot(index="seed", columns="method", values="gauc")[["mqa", "native"]].dropna()
    ci = scipy_stats.ttest_rel(pair["mqa"], pair["native"]).confidence_interval(0.95)
    assert t2.loc["mqa", "kuai ΔGAUC vs native"] == pytest.approx((pair["mqa"] - pair["native"]).mean())
    assert t2.loc["mqa", "kuai ΔGAUC vs native ci95"] == pytest.approx((ci.high - ci.low) / 2)
    verdict = "better" if ci.low > 0 else "worse" if ci.high < 0 else "≈"
    assert t2.loc["mqa", "kuai verdict vs native"] == verdict
    # bold only where the best interval is apart from the runner-up's (scipy's t quantile)
    half = {m: scipy_stats.t.ppf(0.975, len(g) - 1) * g.std(ddof=1) / len(g) ** 0.5
            for m, g in ok.groupby("method")["gauc"]}
    order = means.sort_values(ascending=False).index
    apart = means[order[0]] - half[order[0]] > means[order[1]] + half[order[1]]
    md = (rep.directory / "tables" / "table2_depth1.md").read_text().splitlines()
    header = [c.strip() for c in next(l for l in md if l.startswith("| method")).split("|")]
    col = header.index("kuai GAUC")
    bold = {line.split("|")[1].strip() for line in md
            if line.startswith("| ") and "**" in line.split("|")[col]}
    assert bold == ({order[0]} if apart else set())


def test_failed_cells_are_in_the_failure_table_and_marked_on_figure5(report):
    rep, table = report
    counts = pd.read_csv(rep.directory / "tables" / "failures.csv")
    for (method, depth, seed), status in FAILURES.items():
        row = counts[(counts.dataset == "kuai") & (counts.method == method)
                     & (counts.depth == depth)]
        assert row[status].iloc[0] >= 1, (method, depth, status)
    assert counts["failed"].sum() == 2 * len(FAILURES)  # two datasets
    assert counts[list(("ok", "diverged", "no_learning", "oom", "error"))].to_numpy().sum() \
        == len(table)  # every cell counted once
    failed = pd.read_csv(rep.directory / "tables" / "failed_cells.csv")
    assert len(failed) == 2 * len(FAILURES)
    marked = {(m["dataset"], m["method"], m["depth"]) for m in rep.failure_marks}
    expected = {(ds, m, d) for ds in ("kuai", "amazon") for (m, d, _) in FAILURES}
    assert marked == expected
    kivi = next(m for m in rep.failure_marks if m["method"] == "kivi")
    assert not kivi["at_mean"] and kivi["statuses"] == "error,oom"  # all seeds failed
    assert "kivi@depth 4: error,oom" in rep.html.read_text()


def test_table4_counts_method_code_lines():
    from malloc_ray.methods import REGISTRY
    from malloc_ray.report.tables import code_lines

    class Tiny:
        """Docstring lines are not code."""

        # a comment
        x = 1

        def f(self):
            return 2

    assert code_lines(Tiny) == 4
    assert 5 < code_lines(REGISTRY["native"]) < code_lines(REGISTRY["mla"])


def test_report_logs_artifacts_on_the_study_parent_run(tmp_path):
    from mlflow.tracking import MlflowClient

    study_dir = tmp_path / "s"
    write_fake_study(study_dir, methods=("native", "mqa"), depths=(1,), datasets=("kuai",))
    uri = default_tracking_uri(study_dir)
    run = start_study_run(uri, "s", study_dir)
    provenance.write(study_dir, {"name": "s", "mlflow": {
        "tracking_uri": uri, "experiment": "s", "experiment_id": run.experiment_id,
        "parent_run_id": run.parent_run_id}, "protocol": provenance.PROTOCOL})
    rep = build_report(study_dir, say=lambda _: None)
    assert rep.mlflow_run_id == run.parent_run_id
    client = MlflowClient(uri)
    # the UI opens the study on its runs table, not on the GenAI overview
    tags = client.get_experiment(run.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    top = {a.path for a in client.list_artifacts(run.parent_run_id, "report")}
    assert {"report/report.html", "report/figures", "report/tables"} <= top
    figs = {Path(a.path).name for a in client.list_artifacts(run.parent_run_id, "report/figures")}
    assert {p.name for p in rep.figures} == figs


def test_report_cli_errors_and_leaves_previous_report(tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(InputError, match="trials.parquet"):
        build_report(empty, log_to_mlflow=False, say=lambda _: None)
    done = subprocess.run([sys.executable, "-m", "malloc_ray", "report", str(empty)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "trials.parquet" in done.stderr
    assert not (empty / "report").exists()
    assert not [p for p in empty.iterdir() if p.name.startswith(".report")]


# -- headless Chromium -------------------------------------------------------------------------
def ensure_chromium() -> str:
    """Debian's chromium: found on PATH, else installed with apt-get (root), else skip."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq",
                                                   "--no-install-recommends", "chromium"]):
            subprocess.run(cmd, env=env, capture_output=True, timeout=900)
        if shutil.which("chromium"):
            return shutil.which("chromium")
    pytest.skip("headless Chromium is not installed and could not be installed (apt-get as "
                "root): install Debian's `chromium` package to run the report rendering test")


class _Dom(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tables, self.sections, self.findings = [], [], [], []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        elif tag == "table":
            self.tables.append(attrs.get("data-table"))
        elif tag == "section":
            self.sections.append(attrs.get("id"))
        elif tag == "div" and attrs.get("class") == "finding":
            self.findings.append(attrs.get("data-dataset"))

    def handle_data(self, data):
        self.text.append(data)


# After load, record each image's decoded size on the element, so the dumped DOM shows whether
# the browser actually rendered the figures.
PROBE = ("<script>window.addEventListener('load', () => document.querySelectorAll('img')"
         ".forEach(i => { i.setAttribute('data-rendered-width', i.naturalWidth); "
         "i.setAttribute('data-rendered-height', i.naturalHeight); }));</script>")


def test_report_renders_in_headless_chromium(report, tmp_path):
    chromium = ensure_chromium()
    rep, _ = report
    page = tmp_path / "probe.html"
    page.write_text(rep.html.read_text().replace("</body>", PROBE + "</body>"))
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--virtual-time-budget=10000", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1300,2400", page.as_uri()],
                   capture_output=True, timeout=180, check=True)
    dumped = subprocess.run(flags + ["--dump-dom", page.as_uri()], capture_output=True,
                            text=True, timeout=180, check=True).stdout
    dom = _Dom()
    dom.feed(dumped)
    assert set(SECTIONS) <= set(dom.sections)
    # the page opens with the findings: one block per dataset, numbers with their intervals
    assert dom.sections[0] == "findings" and sorted(dom.findings) == ["amazon", "kuai"]
    text = " ".join(dom.text)
    assert "Native test GAUC" in text and "ΔGAUC" in text and "seeds)" in text
    # the trade-off and depth figures draw 95% CI error bars and say so; the cells have them
    assert text.count("error bars: 95% CI") >= 2 and "mean ± 95% CI" in text
    summary = pd.read_csv(rep.directory / "summary.csv")
    assert summary.loc[summary["n_ok"] > 1, "gauc_ci95"].gt(0).all()
    assert {"table2_depth1", "table3_measured", "table4_methods", "failures",
            "pareto"} <= set(dom.tables)
    figures = [i for i in dom.images if "figure" in (i.get("class") or "")]
    assert len(figures) == len(rep.figures)
    for img in figures:  # every figure decoded to a real bitmap in the browser
        assert int(img["data-rendered-width"]) > 300 and int(img["data-rendered-height"]) > 200

    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[0] >= 2000 and pixels.shape[1] >= 1200
    # A rendered page of tables and plots has many distinct colours; a blank one has one.
    colours = {tuple(p) for p in (pixels[::7, ::7, :3] * 255).astype(int).reshape(-1, 3)}
    assert len(colours) > 50


COMMITTED_REPORTS = sorted((Path(__file__).resolve().parents[1] / "docs" / "results")
                           .glob("*/report/report.html"))


@pytest.mark.parametrize("html_path", COMMITTED_REPORTS, ids=lambda p: p.parent.parent.name)
def test_committed_reports_render_in_headless_chromium(html_path, tmp_path):
    """The study reports docs/results.md links open in a browser: every section, every figure
    decoded to a real bitmap."""
    chromium = ensure_chromium()
    copy = shutil.copytree(html_path.parent, tmp_path / "report")  # figures/ beside the page
    page = copy / "probe.html"
    page.write_text(html_path.read_text().replace("</body>", PROBE + "</body>"))
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu",
             "--virtual-time-budget=10000", f"--user-data-dir={tmp_path / 'profile'}"]
    dumped = subprocess.run(flags + ["--dump-dom", page.as_uri()], capture_output=True,
                            text=True, timeout=180, check=True).stdout
    dom = _Dom()
    dom.feed(dumped)
    assert set(SECTIONS) <= set(dom.sections) and dom.sections[0] == "findings"
    figures = [i for i in dom.images if "figure" in (i.get("class") or "")]
    assert figures
    for img in figures:
        assert int(img["data-rendered-width"]) > 300 and int(img["data-rendered-height"]) > 200
