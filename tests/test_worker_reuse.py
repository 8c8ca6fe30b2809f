"""Tune reuses a slot's worker process for cell after cell (`reuse_actors`): what a cell
measures about its process must be its own, not the high-water mark of the cells before."""

import sys

import numpy as np
import pytest

from malloc_ray.study.trainable import _peak_memory_bytes, reset_peak_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_memory_is_reset_between_cells():
    reset_peak_memory("cpu")
    base = _peak_memory_bytes("cpu")
    big = np.ones(40_000_000)  # 320 MB touched: an earlier, larger cell
    big[::512] += 1
    assert _peak_memory_bytes("cpu") > base + 250e6
    del big
    reset_peak_memory("cpu")  # the next cell starts
    assert _peak_memory_bytes("cpu") < base + 100e6
