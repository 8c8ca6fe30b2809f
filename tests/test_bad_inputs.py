"""Bad inputs a new user tries: each is one line on stderr naming the file, row or key, exit
status 2, and nothing left behind (no output dir, no tmp dirs, no study dir, no Ray started).

CASES is also the source of docs/errors.md: every case's row there must match what the CLI
prints now. Regenerate the page after changing a case or a message:

    .venv/bin/python -m tests.test_bad_inputs --write-docs
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from malloc_ray import cli

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "errors.md"
TMP = "<tmp>"  # what the docs show in place of each case's temporary directory
UNWRITABLE = "/proc/malloc-ray-test"  # even root cannot create entries in /proc
LOG_HEADER = "user,item,timestamp,label\n"
BASE_SPEC = {"name": "s", "datasets": {"syn": {"prepare": {
    "source": "synthetic", "profile": "kuaivideo", "users": 20, "max_len": 16}}},
    "methods": ["native"], "depths": [1], "seeds": [0],
    "trial": {"d_model": 16, "num_heads": 2, "max_len": 16, "epochs": 1}}
Setup = Callable[[Path], list]  # writes a case's inputs under a root dir, returns its argv


@dataclass(frozen=True)
class Case:
    name: str
    kind: str       # the defect class: names | types | late | data | files
    setup: Setup
    expect: str     # a fragment of the one-line message


# -- input builders --------------------------------------------------------------------------
def _write(path: Path, content: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return str(path)


def study(**changes) -> Setup:
    """`study run` on BASE_SPEC with top-level keys changed (a callable value gets the root)."""
    def setup(root: Path) -> list:
        spec = {**BASE_SPEC, "output_dir": str(root / "runs")}
        spec.update({k: v(root) if callable(v) else v for k, v in changes.items()})
        return ["study", "run", _write(root / "spec.yaml", yaml.safe_dump(spec))]
    return setup


def recipe(**options) -> Setup:
    return study(datasets={"syn": {"prepare": {**BASE_SPEC["datasets"]["syn"]["prepare"],
                                               **options}}})


def study_text(text: str) -> Setup:
    return lambda root: ["study", "run", _write(root / "spec.yaml", text)]


def trial_config(text: str, *flags: str) -> Setup:
    return lambda root: ["train", "--config", _write(root / "trial.yaml", text), *flags]


def log_file(name: str, content: str | bytes | Callable[[Path], None]) -> Setup:
    """`data prepare interactions` of a log file (bytes, text, or a function writing it)."""
    def setup(root: Path) -> list:
        path = root / name
        content(path) if callable(content) else _write(path, content)
        return ["data", "prepare", "interactions", str(path), "--out", str(root / "out")]
    return setup


def synthetic_to(out: Callable[[Path], str]) -> Setup:
    def setup(root: Path) -> list:
        _write(root / "afile.txt", "not a directory\n")
        return ["data", "prepare", "synthetic", "--users", "20", "--out", out(root)]
    return setup


def binary_parquet(path: Path) -> None:
    pq.write_table(pa.table({"user": pa.array([b"1", b"1", b"\xff1"], pa.binary()),
                             "item": [1, 2, 3], "timestamp": [1, 2, 3], "label": [0, 1, 0]}),
                   path)


def corrupt_parquet(path: Path) -> None:
    n = 5000
    pq.write_table(pa.table({"user": np.arange(n), "item": np.arange(n),
                             "timestamp": np.arange(n), "label": np.arange(n) % 2}), path)
    data = bytearray(path.read_bytes())
    data[200:2000] = bytes(b ^ 0x5A for b in data[200:2000])  # inside the first data pages
    path.write_bytes(bytes(data))


def broken_users(root: Path) -> list:
    from malloc_ray.data.prepare import prepare

    prepare("synthetic", root / "d", profile="amazon", users=20)
    _write(root / "d" / "users.parquet", b"PAR1 this is not parquet")
    return ["train", "--dataset", str(root / "d"), "--epochs", "1"]


def broken_trials(root: Path) -> list:
    _write(root / "study" / "trials.parquet", b"PAR1 this is not parquet")
    return ["report", str(root / "study"), "--no-mlflow"]


def existing_dir(root: Path) -> str:
    (root / "existing" / "report").mkdir(parents=True)
    return str(root / "existing")


# -- the cases ---------------------------------------------------------------------------------
NAMES = [
    Case("name-absolute-existing-dir", "names", study(name=existing_dir), "key 'name'"),
    Case("name-parent-escape", "names", study(name="../x"), "key 'name'"),
    Case("name-with-slash", "names", study(name="a/b"), "key 'name'"),
    Case("name-dot", "names", study(name="."), "key 'name'"),
    Case("name-dotdot", "names", study(name=".."), "key 'name'"),
    Case("name-with-space", "names", study(name="my study"), "key 'name'"),
    Case("dataset-key-escape", "names", study(datasets={"../../x": BASE_SPEC["datasets"]["syn"]}),
         "key 'datasets'"),
    Case("dataset-key-absolute", "names",
         study(datasets={"/tmp/x": BASE_SPEC["datasets"]["syn"]}), "key 'datasets'"),
    Case("smoke-dataset-key-slash", "names", study(smoke={"datasets": {
        "a/b": BASE_SPEC["datasets"]["syn"]}}), "key 'smoke.datasets'"),
]
TYPES = [
    Case("datasets-as-list", "types", study(datasets=[{"path": "/x"}]), "key 'datasets'"),
    Case("hparams-as-list", "types", study(hparams=[1]), "key 'hparams'"),
    Case("name-not-a-string", "types", study(name=123), "key 'name'"),
    Case("prepare-as-string", "types", study(datasets={"syn": {"prepare": "synthetic"}}),
         "key 'datasets.syn.prepare'"),
    Case("cpus-per-trial-word", "types", study(resources={"cpus_per_trial": "lots"}),
         "key 'resources.cpus_per_trial'"),
    Case("num-samples-word", "types", study(search={"mode": "optuna", "num_samples": "many"}),
         "key 'search.num_samples'"),
    Case("methods-as-string", "types", study(methods="native"), "key 'methods'"),
    Case("trial-value-wrong-type", "types", study(trial={"lr": "fast"}), "key 'trial.lr'"),
    Case("spec-yaml-syntax-error", "types", study_text("name: s\ndatasets: {a: [1\n"),
         "not valid YAML"),
    Case("train-config-yaml-syntax-error", "types", trial_config("dataset: /x\nlr: [1\n"),
         "not valid YAML"),
    Case("train-config-hparams-list", "types", trial_config("dataset: /x\nhparams: [1]\n"),
         "key 'hparams'"),
    Case("train-config-hparams-list-and-flag", "types",
         trial_config("dataset: /x\nhparams: [1]\n", "--hparam", "kv_heads=2"), "key 'hparams'"),
    Case("hparam-flag-bad-yaml", "types", trial_config("dataset: /x\n", "--hparam", "k=[1"),
         "key '--hparam'"),
]
LATE = [
    Case("depth-zero", "late", study(depths=[0]), "key 'depths'"),
    Case("depth-negative", "late", study(depths=[-2]), "key 'depths'"),
    Case("depth-bool", "late", study(depths=[True]), "key 'depths'"),
    Case("seed-bool", "late", study(seeds=[True]), "key 'seeds'"),
    Case("patience-zero", "late", study(trial={**BASE_SPEC["trial"], "patience": 0}),
         "key 'trial.patience'"),
    Case("epochs-bool", "late", study(trial={**BASE_SPEC["trial"], "epochs": True}),
         "key 'trial.epochs'"),
    Case("override-bad-value", "late",
         study(overrides=[{"match": {"method": "native"}, "set": {"lr": -1.0}}]),
         "key 'overrides[0].set.lr'"),
    Case("missing-dataset-path", "late",
         study(datasets=lambda root: {"d": {"path": str(root / "nowhere")}}),
         "key 'datasets.d.path'"),
    Case("missing-recipe-input", "late", study(datasets={"syn": {"prepare": {
        "source": "interactions", "path": "no/such.csv"}}}), "key 'datasets.syn.prepare.path'"),
    Case("recipe-users-zero", "late", recipe(users=0), "key 'datasets.syn.prepare.users'"),
    Case("recipe-users-word", "late", recipe(users="many"), "key 'datasets.syn.prepare.users'"),
    Case("recipe-unknown-option", "late", recipe(userz=5), "userz"),
    Case("recipe-unknown-profile", "late", recipe(profile="tiktok"),
         "key 'datasets.syn.prepare.profile'"),
    Case("recipe-no-source", "late", study(datasets={"syn": {"prepare": {"users": 5}}}),
         "key 'datasets.syn.prepare.source'"),
    Case("recipe-max-seq-len-too-small", "late", recipe(max_seq_len=1),
         "key 'datasets.syn.prepare.max_seq_len'"),
    Case("search-space-bad-distribution", "late",
         study(search={"mode": "optuna", "space": {"lr": {"gaussian": [0, 1]}}}),
         "key 'search.space.lr'"),
]
FILES = [
    Case("out-below-a-file", "files", synthetic_to(lambda r: str(r / "afile.txt" / "sub")),
         "is a file, not a directory"),
    Case("out-unwritable", "files", synthetic_to(lambda r: f"{UNWRITABLE}/out"),
         "not writable"),
    Case("output-dir-unwritable", "files", study(output_dir=UNWRITABLE), "key 'output_dir'"),
    Case("output-dir-below-a-file", "files", study(output_dir=lambda r: _write(
        r / "afile.txt", "x") + "/runs"), "key 'output_dir'"),
    Case("corrupt-users-parquet", "files", broken_users, "users.parquet"),
    Case("corrupt-trials-parquet", "files", broken_trials, "trials.parquet"),
]
DATA = [
    Case("timestamp-1e300", "data", log_file("log.csv", LOG_HEADER + "1,1,1e300,0\n"),
         "row 1"),
    Case("timestamp-beyond-int64", "data",
         log_file("log.csv", LOG_HEADER + "1,1,1,0\n1,2,9223372036854775808,0\n"), "row 2"),
    Case("id-beyond-int64", "data",
         log_file("log.csv", LOG_HEADER + "9223372036854775808,1,1,0\n"), "9223372036854775808"),
    Case("id-20-digits", "data",
         log_file("log.csv", LOG_HEADER + "1,12345678901234567890,1,0\n"), "row 1"),
    Case("csv-not-utf8", "data",
         log_file("log.csv", (LOG_HEADER + "1,1,1,0\n1,\xff,2,1\n").encode("latin-1")), "row 2"),
    Case("csv-header-not-utf8", "data", log_file("log.csv", b"us\xffer,item\n"), "header"),
    Case("parquet-binary-not-utf8", "data", log_file("log.parquet", binary_parquet), "row 3"),
    Case("parquet-corrupt-pages", "data", log_file("log.parquet", corrupt_parquet), "row 1"),
]
CASES = NAMES + TYPES + LATE + FILES + DATA


# -- running a case ------------------------------------------------------------------------------
def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def ray_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def run_cli(argv: list, root: Path) -> tuple[int, str, str]:
    """(exit code, the error line with `root` as TMP, all of stderr) of one in-process run."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main([str(a) for a in argv])
    errors = [line for line in err.getvalue().splitlines() if line.startswith("malloc-ray:")]
    line = errors[-1] if errors else ""
    return code, line.replace(str(root), TMP), err.getvalue()


def doc_row(case: Case, code: int, line: str) -> str:
    message = line.removeprefix("malloc-ray: error: ").replace("|", "\\|")
    return f"| `{case.name}` | {case.kind} | {code} | `{message}` |"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    argv = case.setup(root)
    before, ray_before = tree(root), ray_up()
    code, line, err = run_cli(argv, root)
    assert code == 2, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].replace(str(root), TMP) == line
    assert [x for x in err.splitlines() if x.startswith("malloc-ray:")] == [err.splitlines()[-1]]
    assert case.expect in line, line
    assert tree(root) == before, "a rejected input left files behind"
    assert ray_up() == ray_before, "a rejected input started Ray"
    assert doc_row(case, code, line) in DOCS.read_text(), (
        f"docs/errors.md is stale for {case.name}; run: python -m tests.test_bad_inputs "
        f"--write-docs\n{doc_row(case, code, line)}")


def test_docs_list_no_case_that_is_gone():
    names = {c.name for c in CASES}
    rows = [line.split("`")[1] for line in DOCS.read_text().splitlines()
            if line.startswith("| `")]
    assert sorted(rows) == sorted(names) and len(rows) == len(set(rows))


def write_docs() -> None:
    rows = []
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            code, line, _ = run_cli(case.setup(Path(tmp)), Path(tmp))
        rows.append(doc_row(case, code, line))
    DOCS.write_text(DOCS_HEAD + "\n".join(rows) + "\n")


DOCS_HEAD = f"""# Errors: what bad input looks like

Bad input never ends in a traceback. `malloc-ray` prints one line on stderr,
`malloc-ray: error: WHERE: WHAT`, where WHERE names the file and data row (row 1 is the first
row after a CSV header) or the spec key, and exits with status 2. For every input below
nothing is left behind: no output or study directory, no temporary directories, and Ray is not
started. A study spec is checked as a whole (types, ranges, names, prepare recipes, every
cell's trial config, the files it names, that its directory can be written) before anything is
created.

Names that become path components, the study `name` and the dataset keys, must be letters,
digits, `_`, `.` and `-` only, and not `.` or `..`: everything a study writes stays inside
`<output_dir>/<name>/`.

A prepare killed half-way (even by `SIGKILL`) leaves `<out>.tmp-<host>-<pid>-<random>`; the
next prepare of the same `--out` removes those whose process is gone.

The table lists the bad inputs tried, what each printed (`{TMP}` is the case's temporary
directory) and the exit status. It is generated from the cases in `tests/test_bad_inputs.py`,
which fails when a row differs from what the command prints now; regenerate it with
`.venv/bin/python -m tests.test_bad_inputs --write-docs`. Classes: `names` (names that would
become paths), `types` (values of the wrong type, YAML syntax), `late` (values that used to be
caught only after the study had started), `files` (unwritable or corrupt files), `data` (bad
values in an interaction log).

| case | class | exit | message |
|---|---|---|---|
"""


# -- the fixed behaviour behind some cases -------------------------------------------------------
def test_19_digit_ids_up_to_int64_max_are_read_exactly(tmp_path):
    from malloc_ray.data.sources.interactions import read_log

    big = 2**63 - 1
    path = Path(_write(tmp_path / "log.csv", LOG_HEADER + "".join(
        f"{big - u},{big - i},{i},{i % 2}\n" for u in range(2) for i in range(3))))
    log = read_log(path)
    assert log.user.tolist() == [big] * 3 + [big - 1] * 3
    assert log.item.max() == big and log.ts.tolist() == [0, 1, 2] * 2


def test_a_killed_prepare_leaves_nothing_after_the_next_prepare(tmp_path):
    out = tmp_path / "d"
    # a prepare SIGKILLed while writing: its tmp dir stays behind
    code = ("import os, signal, sys; from malloc_ray.data import prepare as p; "
            "p._write_files = lambda *a: os.kill(os.getpid(), signal.SIGKILL); "
            "p.prepare('synthetic', sys.argv[1], profile='amazon', users=20)")
    killed = subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO)
    assert killed.returncode == -signal.SIGKILL
    stale = list(tmp_path.glob("d.tmp-*"))
    assert len(stale) == 1 and not out.exists()
    # a live writer's tmp dir (this process) and another host's are not ours to remove
    live = tmp_path / f"d.tmp-{socket.gethostname()}-{os.getpid()}-{'a' * 12}"
    other_host = tmp_path / f"d.tmp-elsewhere-{killed_pid(stale[0])}-{'b' * 12}"
    live.mkdir()
    other_host.mkdir()

    from malloc_ray.data.prepare import prepare

    prepare("synthetic", out, profile="amazon", users=20)
    assert (out / "meta.json").is_file()
    assert sorted(tmp_path.iterdir()) == sorted([out, live, other_host])


def killed_pid(path: Path) -> int:
    return int(path.name.rsplit("-", 2)[1])


@pytest.mark.parametrize("fault, epoch", [("raise:0", 0), ("raise:1", 1), ("raise:2", 2)])
def test_an_error_cell_records_the_epoch_that_failed(tmp_path, fault, epoch):
    from malloc_ray.config import TrialConfig
    from malloc_ray.data.prepare import prepare
    from malloc_ray.study.trainable import _failure
    from malloc_ray.train.trial import run_trial

    prepare("synthetic", tmp_path / "d", profile="amazon", users=20)
    cfg = TrialConfig(dataset=str(tmp_path / "d"), d_model=8, num_heads=2, max_len=8,
                      epochs=3, patience=3, max_steps_per_epoch=1, fault=fault)
    with pytest.raises(RuntimeError, match="injected") as err:
        run_trial(cfg)
    assert _failure("error", err.value, {})["failed_epoch"] == epoch


# Per-user state of the libraries, kept in HOME and shared by every study and tool, so not
# study output and never inside a study: Ray's auth token, matplotlib's font cache and config,
# MLflow's telemetry marker.
USER_STATE = ("home/.ray/", "home/.cache/matplotlib/", "home/.config/matplotlib/",
              "home/.config/mlflow/")


def _inside(path: str, prefixes: list[str]) -> bool:
    """`path` is under one of the dir `prefixes`, or is a directory on the way to one."""
    return any((path + "/").startswith(p) or p.startswith(path + "/") for p in prefixes)


@pytest.mark.slow
def test_a_study_writes_only_inside_its_study_dir(tmp_path):
    """Walk a temp root that holds the spec, the output dir, HOME and the working directory,
    before and after a tiny study (the quickstart shrunk, report included): every new file is
    under the study dir. Out of scope: Ray's own session dirs under /tmp/ray (outside this
    root) and the libraries' per-user state in HOME (USER_STATE); anything else counts."""
    spec = yaml.safe_load((REPO / "experiments" / "quickstart.yaml").read_text())
    spec.update(name="walk", output_dir=str(tmp_path / "runs"), methods=["native"],
                depths=[1], seeds=[0], hparams={})
    spec["datasets"]["kuai"]["prepare"].update(users=40, max_len=16)
    spec["trial"].update(epochs=1, max_len=16, d_model=16, num_heads=2)
    (tmp_path / "home").mkdir()
    (tmp_path / "cwd").mkdir()
    path = Path(_write(tmp_path / "spec.yaml", yaml.safe_dump(spec)))
    before = tree(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "malloc_ray", "study", "run", str(path)],
                          cwd=tmp_path / "cwd", env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    new = tree(tmp_path) - before
    outside = sorted(p for p in new if not _inside(p, ["runs/walk/", *USER_STATE]))
    assert not outside, outside
    assert "runs/walk/trials.parquet" in new and "runs/walk/report/report.html" in new


if __name__ == "__main__":
    if "--write-docs" not in sys.argv:
        sys.exit("usage: python -m tests.test_bad_inputs --write-docs")
    write_docs()
    print(f"wrote {DOCS.relative_to(REPO)} ({len(CASES)} cases)")
