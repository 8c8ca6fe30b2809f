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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Work units for `--dist loadgroup` (pyproject.toml): a test without its own xdist_group
    mark joins its file's group, so each file runs on one worker as with loadfile (module
    fixtures are built once); tests/test_docs.py splits its pages into two groups."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


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
