"""Every benchmark's --smoke-test runs its code paths end to end (numbers are not checked:
benchmarks print ratios for docs/benchmarks.md, tests never time anything).

The commands docs/benchmarks.md shows in its ```bash blocks run here, each once, with
`--smoke-test` added (tests/test_docs.py leaves them to this file), and their output is checked
against what the script must print. A script the page only shows in a ```console block (it
needs hardware or hours) gets its own smoke test below."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from test_docs import bash_commands

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "benchmarks.md"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def documented() -> list[list[str]]:
    """The page's benchmark commands, as [script, args...] (the leading `python` dropped)."""
    out = []
    for command in bash_commands(PAGE.read_text()):
        words = shlex.split(command)
        if words and words[0] == "python" and words[1].startswith("benchmarks/"):
            out.append([Path(words[1]).name, *words[2:]])
    return out


def _request_latency(out: str, tmp: Path) -> None:
    assert "cached native request" in out and "of MAC" in out and "wo_mem" in out


def _eval_batch(out: str, tmp: Path) -> None:
    assert out.count("<- default") >= 1  # one per length
    assert "of the best" in out and "the reference" in out


def _tune_overhead(out: str, tmp: Path) -> None:
    assert "plain loop" in out and "Ray Tune study" in out
    assert (tmp / "runs" / "short-tune" / "trials.parquet").is_file()


def _gpu_training(out: str, tmp: Path) -> None:
    for variant in ("eager fp32", "eager bf16", "compile fp32", "compile bf16"):
        assert variant in out
    assert "trials/hour" in out


def _conversion(out: str, tmp: Path) -> None:
    assert '"csv_rows"' in out and '"rows_per_second"' in out  # the measured JSON


# what each documented script must print, and where its files go (a scratch dir, not the repo)
CHECKS = {"request_latency.py": (_request_latency, []), "eval_batch.py": (_eval_batch, []),
          "tune_overhead.py": (_tune_overhead, ["--work-dir", "{tmp}"]),
          "gpu_training.py": (_gpu_training, ["--storage", "{tmp}"]),
          "conversion.py": (_conversion, [])}


SLOW = {"tune_overhead.py", "gpu_training.py", "conversion.py"}  # a study, compiles, a dataset


def _params() -> list:
    return [pytest.param(w, id=" ".join(w), marks=[pytest.mark.slow] if w[0] in SLOW else [])
            for w in documented()]


def test_every_documented_benchmark_has_a_check():
    scripts = {words[0] for words in documented()}
    assert scripts and scripts <= set(CHECKS), sorted(scripts - set(CHECKS))


@pytest.mark.parametrize("words", _params())
def test_documented_benchmark_smoke_runs(words, tmp_path):
    script, args = words[0], [a for a in words[1:] if a != "--smoke-test"]
    check, extra = CHECKS[script]
    done = run(script, *args, "--smoke-test", *(a.format(tmp=tmp_path) for a in extra))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    check(done.stdout, tmp_path)


def test_gpu_training_without_cuda_says_so_and_measures_nothing():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = run("gpu_training.py")
    assert done.returncode != 0
    assert "CUDA is not available" in done.stderr and "nothing was measured" in done.stderr


def test_eval_stream_smoke_prints_both_protocols_and_their_ratio():
    done = run("eval_stream.py", "--smoke-test")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "window:" in done.stdout and "x window" in done.stdout
    assert "largest metric difference" in done.stdout
    assert "one append per target" in done.stdout  # Native declares batched_append


def test_hstu_layer_smoke_runs_ours_without_the_peer():
    """docs/benchmarks.md shows it with --peer-root (a work tree of the peer repository, not
    part of the project); without one it times and measures ours alone."""
    done = run("hstu_layer.py", "--smoke-test", "--peak-memory")
    assert done.returncode == 0, done.stderr[-3000:]
    for phase in ("fwd+bwd", "full forward"):
        assert f"{phase}" in done.stdout and "ours" in done.stdout
    assert done.stdout.count("peak memory growth: ours") == 2 and "peer" not in done.stdout
