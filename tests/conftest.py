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
