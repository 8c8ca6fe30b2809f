"""Shared test fixtures (keep small)."""

import os
from pathlib import Path

import pytest

# Licensed real data sits beside the repo, never inside it (ml-100k may not be redistributed).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared/data"

# xdist workers share the machine's cores: each worker, and every process it starts, gets its
# share of them as torch threads. With 2 threads in each of 2 workers on 2 cores (plus a
# study's trials), the intra-op thread teams oversubscribe the cores and a thread descheduled
# at a join stalls every op: a training test took 70 s instead of 8.5 s (2026-12-02).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
    # Ray starts its workers (a study's trials) at nice 15, below a test that trains in its
    # own pytest process at nice 0: beside two CPU-bound nice-0 processes, the smoke
    # quickstart took 213 s instead of 40 s (2026-12-02). At equal niceness they share fairly.
    os.environ.setdefault("RAY_worker_niceness", "0")


# The longest files first (`--no-loadscope-reorder` keeps this order, pyproject.toml): the
# quickstart's pages run in order on one worker for minutes (tests/test_docs.py); started
# last, as xdist's default order (most tests first) has them, the whole run waits for them.
FIRST = ["tests/test_docs.py", "tests/test_hardening_runs.py", "tests/test_training.py",
         "tests/test_study_run.py"]


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::")[0]
        return FIRST.index(path) if path in FIRST else len(FIRST)
    items.sort(key=rank)  # stable: the other files keep their order


def _real_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"real data not available at {path}")
    return path


@pytest.fixture(scope="session")
def ml100k_inter() -> Path:
    return _real_file("ml-100k/ml-100k.inter")


@pytest.fixture(scope="session")
def toys_sequences() -> Path:
    return _real_file("amazon-toys-s3rec/Toys_and_Games.txt")


@pytest.fixture(autouse=True)
def _no_exported_mlflow_uri(monkeypatch):
    """`mlflow.set_tracking_uri` exports MLFLOW_TRACKING_URI; without this, a URI set by one test
    would redirect the studies (and their subprocesses) of every later test. Removed before
    each test and restored to absent after it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for a module's in-process studies (they run as the CLI would); shut down
    after the module if the module started it."""
    import ray

    started = not ray.is_initialized()
    yield
    if started and ray.is_initialized():
        ray.shutdown()
