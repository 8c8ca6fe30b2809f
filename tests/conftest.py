"""Shared test fixtures (keep small)."""

from pathlib import Path

import pytest

# Licensed real data sits beside the repo, never inside it (ml-100k may not be redistributed).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared/data"


@pytest.fixture(scope="session")
def ml100k_inter() -> Path:
    path = SHARED_DATA / "ml-100k" / "ml-100k.inter"
    if not path.is_file():
        pytest.skip(f"real data not available at {path}")
    return path


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
