"""Invariants every registered memory method must hold; a new method gets them for free."""

import pytest
import torch

from malloc_ray.methods import method_names
from malloc_ray.metrics.cost import closed_form_macs, flop_counter_macs, measure_user_bytes
from model_fixtures import history, random_batch, tiny_model

METHODS = method_names()
LENGTHS = [21, 8, 14, 21]


@pytest.mark.parametrize("method", METHODS)
def test_no_label_leakage(method):
    """Changing y_t never changes the logit of i_t or of any earlier item."""
    model = tiny_model(method)
    batch = random_batch(LENGTHS, seed=11)
    base = model.logits(batch).detach()
    s = batch["items"].shape[1]
    for t in (s - 1, s - 4, s - 9):
        changed = {**batch, "labels": batch["labels"].clone()}
        changed["labels"][:, t] = 1 - changed["labels"][:, t]
        after = model.logits(changed).detach()
        torch.testing.assert_close(after[:, : t + 1], base[:, : t + 1], rtol=0, atol=0)
        if t < s - 1:  # the probe must be able to fail: later items do see y_t
            assert (after[:, t + 1:] - base[:, t + 1:]).abs().max() > 0


@pytest.mark.parametrize("method", METHODS)
def test_step_after_prefill_equals_forward_at_target(method):
    model = tiny_model(method)
    batch = random_batch(LENGTHS, seed=12)
    full = model.logits(batch)[:, -1].detach()
    served = model.score(model.prefill(*history(batch)), batch["items"][:, -1:])[:, 0]
    torch.testing.assert_close(served, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_measured_bytes_equal_closed_form(method):
    model = tiny_model(method, layers=2)
    for n_history in (3, 17):
        measured = measure_user_bytes(model, n_history)
        for metadata, key in ((False, "payload"), (True, "with_metadata")):
            formula = 2 * model.method.memory_bytes(model.cfg, model.hp, 2 * n_history, metadata)
            assert measured[key] == formula, (metadata, n_history)


@pytest.mark.parametrize("method", METHODS)
def test_closed_form_matmul_macs_match_flop_counter(method):
    model = tiny_model(method, layers=2)
    for n_history, q in ((5, 1), (16, 3)):
        assert flop_counter_macs(model, n_history, q) == \
            closed_form_macs(model, n_history, q)["request_matmul"]
