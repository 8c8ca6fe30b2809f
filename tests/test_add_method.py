"""docs/methods/README.md's "Adding a method", followed step by step in a scratch copy of the
project: a throwaway method touches exactly the files the page lists, and the registry-driven
contract tests then pick it up (and pass) with no test edit."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

MODULE = '''"""Half-KV: grouped-query attention with half as many K,V heads as query heads.

A throwaway method written by tests/test_add_method.py from docs/methods/README.md.
"""

from malloc_ray.methods.base import NoHparams, TestSetting, register
from malloc_ray.methods.heads import GQA


@register
class HalfKV(GQA):
    name = "halfkv"
    Hparams = NoHparams
    test_settings = (TestSetting(id="half", hparams={}, lengths=(19, 7, 12, 19, 4)),)

    @classmethod
    def kv_heads_for(cls, cfg, hp) -> int:
        return cfg.num_heads // 2
'''


def _steps(root: Path) -> None:
    """The page's numbered steps 1-5 (6 is optional family tests, 7 does not apply)."""
    steps = (REPO / "docs" / "methods" / "README.md").read_text().split("## Adding a method")[1]
    for path in ("malloc_ray/methods/<module>.py", "malloc_ray/methods/__init__.py",
                 "docs/methods/<name>.md", "docs/methods/README.md",
                 "experiments/paper_table2.yaml", "experiments/depth_scaling.yaml"):
        assert path in steps, f"the page no longer names {path}; update this test with it"
    # 1. the module
    (root / "malloc_ray/methods/halfkv.py").write_text(MODULE)
    # 2. one import line
    init = root / "malloc_ray/methods/__init__.py"
    text = init.read_text()
    init.write_text(text.replace("from malloc_ray.methods import heads  # noqa: F401\n",
                                 "from malloc_ray.methods import halfkv  # noqa: F401\n"
                                 "from malloc_ray.methods import heads  # noqa: F401\n"))
    # 3. its page
    (root / "docs/methods/halfkv.md").write_text("# halfkv\n\nHalf as many K,V heads.\n")
    # 4. its table row, after gqa's
    table = root / "docs/methods/README.md"
    text = table.read_text()
    gqa = next(line for line in text.splitlines() if line.startswith("| `gqa` "))
    table.write_text(text.replace(gqa + "\n", gqa + "\n| `halfkv` | head | trained | "
                                  "`halfkv.py` | K, V of half the heads | [halfkv](halfkv.md) |\n"))
    # 5. the paper specs' method lists
    for spec in ("paper_table2.yaml", "depth_scaling.yaml"):
        path = root / "experiments" / spec
        text = path.read_text()
        path.write_text(re.sub(r"(methods: \[native,)", r"\1 halfkv,", text, count=1))


def test_how_to_add_a_method_is_enough(tmp_path):
    root = tmp_path / "repo"
    for name in ("malloc_ray", "docs", "experiments", "tests"):
        shutil.copytree(REPO / name, root / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, root / name)
    if (REPO.parent / "shared").exists():
        os.symlink(REPO.parent / "shared", tmp_path / "shared")
    _steps(root)
    env = {**os.environ, "PYTHONPATH": str(root)}  # the copy's package, not the checkout's
    tests = ["tests/test_method_contract.py", "tests/test_paper_specs.py::"
             "test_paper_specs_carry_the_papers_settings"]
    # -n 0: one process (this test already holds one of the machine's xdist workers)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0",
                           "-p", "no:cacheprovider",
                           "-k", "halfkv or every_registered or table or without_its_own or "
                           "paper_specs_carry", *tests],
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    ran = re.search(r"(\d+) passed", done.stdout)
    # the new method's contract cases ran (leakage, serving, bytes, MACs, compression)
    assert ran and int(ran.group(1)) >= 8, done.stdout[-2000:]
    assert "halfkv" not in (REPO / "malloc_ray/methods/__init__.py").read_text()
