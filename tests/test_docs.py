"""Docs cannot drift: every shell command in a ```bash block of the README, docs/ and
clusters/README.md is executed, in order, in a scratch copy of the repository: the
quickstart's pages here, the others in tests/test_docs_pages.py.

Conventions the docs follow:
* ```bash blocks hold commands that run on a CPU machine; ```console blocks hold commands that
  need a real cluster or GPU (shown with a `$` prompt) and are not run;
* the README's set-up commands start with `python3 -m venv .venv && .venv/bin/pip install ...`:
  the install is what CI itself runs, so here it is dropped and the rest of the line is run in
  the same environment; the test command itself is CI's only step and is not run again;
* `benchmarks/*.py` commands run in tests/test_benchmarks.py, once each, with `--smoke-test`
  (a full benchmark takes minutes to hours; its figures are recorded in docs/benchmarks.md);
* a `malloc-ray study run` a page repeats from an earlier page (the quickstart, which several
  pages show before using its study) is not run again: the study it made is what the page
  reads (re-running a finished study is `study resume` on docs/study.md, which does run);
* `mlflow ui` is started on a free port, must answer HTTP 200, and is stopped.
Inputs a command reads that the docs tell users to bring (a log.csv, reczoo downloads) are
generated before the commands of that page run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# The quickstart's pages, in order: later ones use the study the README's command made. They
# run here, on one xdist worker (the tests run one file per worker at a time, pyproject.toml).
PAGES = ["README.md", "docs/quickstart.md", "docs/study.md", "docs/mlflow.md", "docs/report.md"]
# Pages that use nothing an earlier page made: tests/test_docs_pages.py runs them, beside the
# quickstart's pages on the other worker.
OTHER_PAGES = ["docs/data.md", "docs/results.md", "docs/benchmarks.md", "clusters/README.md"]
INSTALL = re.compile(r"^python3 -m venv \.venv && \.venv/bin/pip install [^&]*&& ")
pytestmark = pytest.mark.slow


def bash_commands(text: str) -> list[str]:
    """Commands of the ```bash blocks: continuation lines joined, comments and blanks dropped."""
    commands, block, inside = [], [], False
    for line in text.splitlines():
        if line.startswith("```"):
            if inside:
                commands += _split(block)
            inside, block = line.strip() == "```bash", []
        elif inside:
            block.append(line)
    return commands


def _split(lines: list[str]) -> list[str]:
    out, current = [], ""
    for line in lines:
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        command = re.sub(r"\s+#.*$", "", current).strip() if not current.lstrip().startswith(
            "#") else ""
        if command:
            out.append(command)
        current = ""
    return out


def test_every_page_with_commands_is_covered():
    pages = [p.relative_to(REPO).as_posix() for p in
             [REPO / "README.md", REPO / "clusters" / "README.md", *REPO.glob("docs/**/*.md")]]
    with_commands = {p for p in pages if bash_commands((REPO / p).read_text())}
    covered = set(PAGES) | set(OTHER_PAGES)
    assert with_commands <= covered, f"add to OTHER_PAGES: {sorted(with_commands - covered)}"


def test_command_parsing():
    text = "x\n```bash\n# c\nmalloc-ray a \\\n    --b 1   # why\n\nls\n```\n```console\n$ no\n```"
    assert [" ".join(c.split()) for c in bash_commands(text)] == ["malloc-ray a --b 1", "ls"]


# -- inputs the docs ask users to bring --------------------------------------------------------
def _data_page_inputs(root: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    import reczoo_fixtures as fx

    rng = np.random.default_rng(0)
    n = 600
    user, item = rng.integers(1, 40, n), rng.integers(1, 200, n)
    ts, label = np.arange(n) * 10, (rng.random(n) < 0.3).astype(int)
    pd.DataFrame({"user": user, "item": item, "timestamp": ts, "label": label, "uid": user,
                  "iid": item, "ts": ts, "clicked": label}).to_csv(root / "log.csv", index=False)
    pd.DataFrame({"user": user, "item": item, "timestamp": ts,
                  "stars": rng.integers(1, 6, n).astype(float)}).to_parquet(
        root / "ratings.parquet")
    data = root / "data"
    fx.write_kuaivideo_x1(data / "KuaiVideo_x1", fx.paper_truth("kuaivideo", 30, max_len=64))
    fx.write_microvideo_x1(data / "MicroVideo1.7M_x1", fx.paper_truth("microvideo", 30,
                                                                      max_len=64))
    fx.write_amazon_x1(data / "AmazonElectronics_x1", fx.amazon_reviews(30))
    fx.write_longctr_x2(data / "KuaiVideo_x2", fx.paper_truth("kuaivideo", 30, max_len=64))


SETUP = {"docs/data.md": _data_page_inputs}


# -- what a page claims about its commands' output ----------------------------------------------
def _recorded_auc(text: str, row: str) -> float:
    """The test AUC of the results table row starting with `row`."""
    line = next(l for l in text.splitlines() if l.startswith(f"| {row}"))
    return float(line.split("|")[2].strip().strip("*"))


def _recorded_status(text: str, row: str) -> str:
    line = next(l for l in text.splitlines() if l.startswith(f"| {row}"))
    return line.split("|")[-2].strip()


def _long_history_result(text: str, printed: list[tuple[str, str]], root: Path) -> None:
    """docs/results.md: full window beats the last 8 interactions by >= 0.02 test AUC, and the
    table records what the two trainings print: the full window's AUC (to float drift between
    machines) and both statuses. The last-8 model does not learn; its AUC is noise around 0.5
    that moves by 0.01 with torch's thread count alone, so only its status is compared."""
    trains = [json.loads(out) for raw, out in printed if raw.startswith("malloc-ray train")]
    assert len(trains) == 2, "docs/results.md: expected the full-window and last-8 trainings"
    full, last8 = trains
    assert full["auc"] - last8["auc"] >= 0.02, (full["auc"], last8["auc"])
    assert abs(full["auc"] - _recorded_auc(text, "full")) < 0.01, full["auc"]
    assert full["status"] == _recorded_status(text, "full"), full["status"]
    assert last8["status"] == _recorded_status(text, "last 8"), last8["status"]


def _quickstart_shows_a_finding(text: str, printed: list[tuple[str, str]], root: Path) -> None:
    """README quickstart: Native learns (mean test AUC >= 0.65 over >= 3 seeds) and at least one
    method differs from it beyond seed noise (a verdict other than "≈"), read from the report's
    summary.csv as a user would."""
    summary = pd.read_csv(root / "runs" / "quickstart" / "report" / "summary.csv")
    native = summary[summary["method"] == "native"]
    assert len(native) and (native["n_ok"] >= 3).all(), native.to_string()
    assert (native["auc"] >= 0.65).all(), native[["depth", "auc", "auc_ci95"]].to_string()
    verdicts = summary.loc[summary["method"] != "native", "verdict_vs_native"]
    assert verdicts.isin(["better", "worse"]).any(), summary[
        ["method", "depth", "delta_gauc_vs_native", "verdict_vs_native"]].to_string()


CHECKS = {"README.md": _quickstart_shows_a_finding, "docs/results.md": _long_history_result}


# -- running -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """<tmp>/repo with the repository's files linked in, and <tmp>/shared beside it, so that
    `../shared/data` in a command means what it means in a checkout."""
    base = tmp_path_factory.mktemp("docs")
    root = base / "repo"
    root.mkdir()
    for name in ("malloc_ray", "experiments", "benchmarks", "clusters", "tests", "docs",
                 "pyproject.toml", "README.md"):
        (root / name).symlink_to(REPO / name)
    (root / ".venv").symlink_to(Path(sys.prefix))
    if SHARED.exists():
        (base / "shared").symlink_to(SHARED)
    return root


def _env() -> dict:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_mlflow_ui(command: str, root: Path) -> None:
    port = _free_port()
    command = re.sub(r"--port \d+", f"--port {port}", command)
    proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=root, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    assert r.status == 200
                    return
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                time.sleep(1)
        pytest.fail(f"`{command}` did not answer on 127.0.0.1:{port}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


_STUDIES_RUN: set[str] = set()  # study commands run so far (the pages share one scratch repo)


def _prepare(command: str) -> str | None:
    if INSTALL.match(command):
        command = INSTALL.sub("", command)
        if "pytest" in command:
            return None  # the test command is CI's own step
    if re.search(r"(^|\s)(python\s+)?benchmarks/\S+\.py", command):
        return None  # tests/test_benchmarks.py runs the page's benchmark commands
    study = re.sub(r"^(\.venv/bin/)?", "", command)
    if study.startswith("malloc-ray study run "):
        if study in _STUDIES_RUN:
            return None
        _STUDIES_RUN.add(study)
    return command


@pytest.mark.parametrize("page", PAGES)
def test_documented_commands_run(page, scratch):
    run_page(page, scratch)


def run_page(page: str, scratch: Path) -> None:
    """Run a page's commands in order in `scratch`, then its CHECKS; each command's wall time
    is printed (`pytest -rP` shows it)."""
    commands = bash_commands((REPO / page).read_text())
    if any("../shared" in c for c in commands) and not SHARED.exists():
        pytest.skip(f"{page} reads ../shared/data, which is not present beside the checkout")
    if page in SETUP:
        SETUP[page](scratch)
    printed: list[tuple[str, str]] = []
    for raw in commands:
        command = _prepare(raw)
        if command is None:
            continue
        start = time.time()
        if re.match(r"^(\.venv/bin/)?mlflow ui\b", command):
            _check_mlflow_ui(command, scratch)
            print(f"{page}: {time.time() - start:6.1f} s  {raw}")
            continue
        done = subprocess.run(["bash", "-c", command], cwd=scratch, env=_env(),
                              capture_output=True, text=True, timeout=1200)
        print(f"{page}: {time.time() - start:6.1f} s  {raw}")
        assert done.returncode == 0, (
            f"{page}: `{raw}` exited {done.returncode}\n{done.stdout[-2000:]}\n"
            f"{done.stderr[-3000:]}")
        printed.append((raw, done.stdout))
    if page in CHECKS:
        CHECKS[page]((REPO / page).read_text(), printed, scratch)


# -- docs/results.md tables that trace to committed study tables ---------------------------------
RESULTS = REPO / "docs" / "results"


def table_after(text: str, heading: str) -> list[list[str]]:
    """Body rows (cells stripped of ** and spaces) of the first markdown table after `heading`."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().strip("*").strip() for c in line.strip().strip("|").split("|")])
    return rows


def largest_fall(history: str) -> float:
    """How far validation AUC fell below its best before the run stopped (0: never)."""
    aucs = [r["valid_auc"] for r in json.loads(history)]
    best = np.maximum.accumulate(aucs)
    return float(max(best - aucs)) if aucs else float("nan")


def test_backbone_table_traces_to_the_committed_study():
    """Every figure of docs/results.md "The backbone" equals what docs/results/backbone/
    trials.csv (the study's trials table) and peers.csv (the library models' `malloc-ray
    baseline` outputs) give: mean ± 95% CI over seeds, seeds, train time and the largest fall
    of validation AUC below its best."""
    from malloc_ray.study.stats import ci95

    trials = pd.concat([pd.read_csv(RESULTS / "backbone" / f"{name}.csv")
                        for name in ("trials", "peers")], ignore_index=True)
    rows = table_after((REPO / "docs" / "results.md").read_text(), "## The backbone")
    assert {(r[0], r[1]) for r in rows} == set(zip(trials["dataset"], trials["method"]))
    for dataset, model, auc, gauc, logloss, seeds, train, fall, _machine in rows:
        mine = trials[(trials["dataset"] == dataset) & (trials["method"] == model)]
        assert (mine["status"] == "ok").all(), (dataset, model)
        for cell, metric in ((auc, "auc"), (gauc, "gauc")):
            mean, _, half = cell.partition(" ± ")
            assert float(mean) == round(mine[metric].mean(), 4), (dataset, model, metric)
            if half:
                assert float(half) == round(ci95(mine[metric]), 4), (dataset, model, metric)
        if logloss != "–":
            assert float(logloss) == round(mine["logloss"].mean(), 4), (dataset, model)
        assert int(seeds) == len(mine), (dataset, model)
        if train != "–":
            assert float(train.rstrip(" s")) == round(mine["train_seconds"].mean()), (dataset, model)
        if fall != "–":  # the baselines keep no curve, nor does the library models' trainer
            falls = [largest_fall(h) for h in mine["history"]]
            assert float(fall) == round(max(falls), 4), (dataset, model)


# Table 2 studies on real data (docs/results.md, "Table 2 ..."): their trials tables are under
# docs/results/<study>/trials.csv.
TABLE2_STUDIES = ("ml100k_table2", "toys_table2", "longhist_table2")


def _study_tables(trials: pd.DataFrame) -> list:
    """The report's accuracy and measured-cost tables, rebuilt from a committed trials table
    with the report's own code (malloc_ray/report/build.py)."""
    from malloc_ray.report import tables
    from malloc_ray.study import pareto

    summary = pareto.pareto_table(trials)
    methods = ~pareto.is_baseline(trials)
    return [*tables.table2(summary),
            tables.table3(trials[methods], summary[~pareto.is_baseline(summary)]),
            tables.depth_effect(trials[methods], summary[~pareto.is_baseline(summary)]),
            tables.failure_counts(trials)]


@pytest.mark.parametrize("study", TABLE2_STUDIES)
def test_table2_sections_trace_to_the_committed_trials(study):
    """Every row of the study's accuracy, cost and failure tables on docs/results.md is the
    row the report's code makes from docs/results/<study>/trials.csv, and the figures the page
    shows exist; Native never ends no_learning and equals w/o Mem to 1e-6 in AUC per cell."""
    text = (REPO / "docs" / "results.md").read_text()
    trials = pd.read_csv(RESULTS / study / "trials.csv")
    for table in _study_tables(trials):
        body = [line for line in table.markdown().splitlines() if line.startswith("| ")]
        missing = [line for line in body if line not in text]
        assert not missing, (study, table.name, missing[:3])
    for image in re.findall(rf"\(results/{study}/([^)]+\.png)\)", text):
        assert (RESULTS / study / image).is_file(), image
    assert re.search(rf"\(results/{study}/[^)]+\.png\)", text), "no figure of the study shown"
    native = trials[trials["method"] == "native"]
    assert len(native) and (native["status"] == "ok").all()
    pairs = trials[trials["method"].isin(["native", "wo_mem"])].pivot_table(
        index=["dataset", "depth", "seed"], columns="method", values="auc")
    assert (pairs["native"] - pairs["wo_mem"]).abs().max() <= 1e-6
