"""Module hygiene, read off the source with `ast` (project issue 13, acceptance 4): no module
imports another's private (`_name`) names, and no module in malloc_ray/data/sources/ is over
300 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "malloc_ray"
SOURCES = PACKAGE / "data" / "sources"
MAX_SOURCE_LINES = 300


def _private(name: str) -> bool:
    """One leading underscore, not a dunder (`__version__`, `__all__` are public)."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(path: Path) -> list[str]:
    """`from malloc_ray.x import _name` (and `from . import _name`) in one file, as
    'file:line: module._name'. Aliasing a public name to a private one is fine, and so is a
    public name of a helper module named privately (`from malloc_ray.m._common import f`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        module = node.module or ""
        if node.level == 0 and module != "malloc_ray" and not module.startswith("malloc_ray."):
            continue  # a third-party or standard module's business
        for alias in node.names:
            if _private(alias.name):
                where = path.relative_to(PACKAGE.parent)
                found.append(f"{where}:{node.lineno}: {'.' * node.level}{module}"
                             f"{'.' if module else ''}{alias.name}")
    return found


def test_the_checks_see_what_they_should():
    assert _private("_csv_batches") and _private("_Bar")
    assert not _private("__version__") and not _private("ensure_ray")


def test_no_private_name_is_imported_across_modules():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    violations = [v for f in files for v in private_imports(f)]
    assert not violations, "private names imported across modules:\n" + "\n".join(violations)


def test_no_source_module_is_over_300_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in sorted(SOURCES.glob("*.py"))}
    assert "reczoo.py" in sizes
    over = {name: n for name, n in sizes.items() if n > MAX_SOURCE_LINES}
    assert not over, f"modules of malloc_ray/data/sources/ over {MAX_SOURCE_LINES} lines: {over}"


def test_commands_and_study_drivers_do_not_import_metric_libraries():
    """torchmetrics' package import pulls in scipy.signal and matplotlib, and scipy.stats is
    heavy too: the CLI and a study driver (which compute no metric) import neither, so every
    `malloc-ray` process starts without paying for them. A metric imports torchmetrics."""
    import subprocess
    import sys

    code = ("import sys, malloc_ray.cli, malloc_ray.study.run; "
            "print(sorted(m for m in ('torchmetrics', 'scipy.stats') if m in sys.modules)); "
            "from malloc_ray.metrics.ranking import auc; auc([0, 1], [0.2, 0.7]); "
            "print('torchmetrics' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[:2] == ["[]", "True"], out
