"""Every benchmark's --smoke-test runs its code paths end to end (numbers are not checked:
benchmarks print ratios for docs/benchmarks.md, tests never time anything)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_request_latency_smoke_prints_both_lengths_against_macs():
    done = run("request_latency.py", "--smoke-test", "--lengths", "128,1024")
    assert done.returncode == 0, done.stderr[-3000:]
    for length in (16, 64):  # the smoke test's stand-ins for the two lengths
        assert f"L={length}: cached native request" in done.stdout
    assert "of MAC" in done.stdout and "wo_mem" in done.stdout


def test_eval_batch_smoke_marks_the_default_and_the_reference():
    done = run("eval_batch.py", "--smoke-test")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("<- default") == 1
    assert "of the best" in done.stdout and "the reference" in done.stdout


@pytest.mark.slow
def test_tune_overhead_smoke_runs_both_sides(tmp_path):
    done = run("tune_overhead.py", "--smoke-test", "--work-dir", str(tmp_path))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "plain loop" in done.stdout and "Ray Tune study" in done.stdout
    assert (tmp_path / "runs" / "short-tune" / "trials.parquet").is_file()


@pytest.mark.slow
def test_gpu_training_smoke_runs_every_variant_on_cpu(tmp_path):
    done = run("gpu_training.py", "--smoke-test", "--storage", str(tmp_path))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    for variant in ("eager fp32", "eager bf16", "compile fp32", "compile bf16"):
        assert variant in done.stdout
    assert "trials/hour" in done.stdout


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
