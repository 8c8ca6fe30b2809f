"""Serving lives in model/serving.py, and model/ does not reach back up into the method registry.

Cached serving (native) and recompute serving (wo_mem) are checked against an independent
oracle: the training forward, `model.logits`, on the same weights (fp32, dropout off).
"""

import ast
from pathlib import Path

import pytest
import torch

import malloc_ray.model
from malloc_ray.methods import get_method
from malloc_ray.model.ctr import CTRModel
from malloc_ray.model.serving import CachedServing, RecomputeServing
from model_fixtures import assert_appends_match_forward, random_batch, tiny_config, tiny_model

LENGTHS = [21, 8, 5, 14, 21]  # left padding inside one batch
MODEL_DIR = Path(malloc_ray.model.__file__).parent


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_model_package_imports_nothing_from_methods():
    files = sorted(MODEL_DIR.glob("*.py"))
    assert {f.name for f in files} >= {"ctr.py", "hstu.py", "serving.py"}
    for path in files:
        upward = {n for n in imported_modules(path)
                  if n == "malloc_ray.methods" or n.startswith("malloc_ray.methods.")
                  or n == "malloc_ray.get_method"}
        assert not upward, f"{path.name} imports {sorted(upward)}"


def test_serving_is_chosen_from_the_method_class():
    assert tiny_model("native", layers=1).serving is CachedServing
    assert tiny_model("wo_mem", layers=1).serving is RecomputeServing
    with pytest.raises(TypeError, match="get_method"):
        CTRModel(tiny_config(1), "native", 60)


@pytest.mark.parametrize("method", ["native", "wo_mem"])
def test_serving_equals_training_forward(method):
    model = tiny_model(method, layers=2)
    assert model.method is get_method(method)
    batch = random_batch(LENGTHS, seed=7)
    full = assert_appends_match_forward(model, batch, (1, 2))
    torch.testing.assert_close(model.predict(batch), torch.sigmoid(full[:, -1]),
                               rtol=0, atol=1e-6)
