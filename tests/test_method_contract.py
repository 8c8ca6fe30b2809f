"""Invariants every registered memory method must hold; a new method gets them for free.

Each method runs at every setting it declares (`Method.test_settings`): hyperparameters at
which it really compresses on the tiny model. At the defaults, sized for the paper's
histories, KIVI would quantize nothing, Beacon store no beacon, Reformer hash into one bucket,
and these invariants would hold for a method that does nothing.
"""

import re
from pathlib import Path

import pytest
import torch

from malloc_ray.methods import REGISTRY, Method, method_names
from malloc_ray.methods.base import TestSetting, setting_problems
from malloc_ray.methods.native import Native
from malloc_ray.metrics.cost import closed_form_macs, flop_counter_macs, measure_user_bytes
from model_fixtures import history, random_batch, tiny_config, tiny_model

REPO = Path(__file__).resolve().parents[1]
METHODS = method_names()
MAX_LEN = tiny_config().max_len


def cases(keep=lambda cls: True):
    """(method, setting) pairs, named `method-setting` in the test ids."""
    return [pytest.param(name, s, id=f"{name}-{s.id}") for name in METHODS
            if keep(REGISTRY[name]) for s in REGISTRY[name].__dict__.get("test_settings", ())]


CASES = cases()


def build(name: str, setting: TestSetting, layers: int = 3):
    """The method's tiny model at the setting. Post-hoc methods carry a Native model's weights
    (another seed than their own init), as in a study, where they load Native's checkpoint."""
    model = tiny_model(name, layers=layers, seed=1, hparams=setting.hparams)
    if model.method.workflow == "post-hoc":
        model.load_state_dict(tiny_model("native", layers=layers).state_dict(), strict=True)
    return model


def serve(model, batch, candidates=None):
    """Scores through the serving path: prefill the history, then one request."""
    candidates = batch["items"][:, -1:] if candidates is None else candidates
    return model.score(model.prefill(*history(batch)), candidates)


def histories(setting: TestSetting) -> list[int]:
    """History lengths (interactions) to measure at: tiny, small, the setting's longest."""
    return sorted({1, 3, max(setting.lengths) - 1})


# -- the declarations ------------------------------------------------------------------------
def test_every_registered_method_declares_test_settings():
    problems = setting_problems(REGISTRY, MAX_LEN)
    assert not problems, "\n".join(problems)


def test_a_method_without_its_own_settings_is_rejected():
    """The check above can fail: a method with no settings, and a subclass relying on its
    parent's (another method needs its own), are both reported. A copy of the registry holds
    them, so REGISTRY is left as it is."""
    class Bare(Method):
        name, category = "bare", "none"

    class Child(Native):
        name = "child"

    registry = {**REGISTRY, "bare": Bare, "child": Child}
    problems = setting_problems(registry, MAX_LEN)
    assert len(problems) == 2, problems
    assert all("declares no test settings" in p and "test_settings = (TestSetting(" in p
               for p in problems)
    assert "class Child in" in problems[1] and "inherited" in problems[1]
    broken = type("Broken", (Native,), {"name": "broken", "test_settings": (
        TestSetting(id="x y", hparams={"nope": 1}, lengths=(41,)),)})
    assert len(setting_problems({"broken": broken}, MAX_LEN)) == 3  # id, hparams, lengths


def test_methods_table_lists_every_registered_method():
    """docs/methods/README.md's table is how a reader finds the methods: one row per
    registered method, with its category and workflow, linking a page that exists."""
    text = (REPO / "docs" / "methods" / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| ([\w-]+) \| ([\w-]+) \|.*\[\w+\]\((\w+\.md)\) \|$", text,
                      re.M)
    assert {r[0]: r[1:3] for r in rows} == {n: (REGISTRY[n].category, REGISTRY[n].workflow)
                                            for n in METHODS}
    for name, *_, page in rows:
        assert page == f"{name}.md" and (REPO / "docs" / "methods" / page).is_file(), name


# -- the invariants, per (method, setting) -------------------------------------------------
@pytest.mark.parametrize("name,setting", CASES)
def test_no_label_leakage(name, setting):
    """Changing y_t never changes the logit of i_t or of any earlier item, for every t."""
    model = build(name, setting)
    batch = random_batch(setting.lengths, seed=11)
    with torch.no_grad():
        base = model.logits(batch)
        s = batch["items"].shape[1]
        for t in range(s):
            changed = {**batch, "labels": batch["labels"].clone()}
            changed["labels"][:, t] = 1 - changed["labels"][:, t]
            after = model.logits(changed)
            torch.testing.assert_close(after[:, : t + 1], base[:, : t + 1], rtol=0, atol=0)
            if t < s - 1:  # the probe must be able to fail: later items do see y_t
                assert (after[:, t + 1:] - base[:, t + 1:]).abs().max() > 0, t


@pytest.mark.parametrize("name,setting", CASES)
def test_serving_equals_forward_at_target(name, setting):
    """`score(prefill(history))` is the model's own forward at the target, alone or inside a
    slate of candidates (each sees the history and itself only)."""
    model = build(name, setting)
    batch = random_batch(setting.lengths, seed=12)
    with torch.no_grad():
        full = model.logits(batch)[:, -1]
    torch.testing.assert_close(serve(model, batch)[:, 0], full, rtol=0, atol=1e-5)
    others = torch.randint(1, 60, (len(setting.lengths), 3),
                           generator=torch.Generator().manual_seed(12))
    slate = torch.cat([others[:, :2], batch["items"][:, -1:], others[:, 2:]], 1)
    torch.testing.assert_close(serve(model, batch, slate)[:, 2], full, rtol=0, atol=1e-5)


LOSSLESS = cases(lambda cls: cls.lossless)


@pytest.mark.parametrize("name,setting", LOSSLESS)
def test_lossless_serving_equals_native_and_wo_mem(name, setting):
    """A lossless method, Native and w/o Mem with the same weights give the same scores."""
    model = build(name, setting)
    batch = random_batch(setting.lengths, seed=13)
    served = serve(model, batch)[:, 0]
    for other in ("native", "wo_mem"):
        twin = tiny_model(other, seed=2)
        twin.load_state_dict(model.state_dict(), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(twin.logits(batch)[:, -1], served, rtol=0, atol=1e-5)
        torch.testing.assert_close(serve(twin, batch)[:, 0], served, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,setting", cases(lambda cls: cls.appends_in_batches()))
def test_batched_append_equals_appends_one_at_a_time(name, setting):
    """A method declaring `batched_append`: appending k interactions in one step gives each
    new item the logit it gets when they are appended one at a time (the oracle), and the
    memory after it scores the next candidate the same; k from 1 to most of the window."""
    model = build(name, setting)
    batch = random_batch((max(setting.lengths), MAX_LEN - 1, 21), seed=17)  # room to score
    for k in (1, 3, 8, 16):
        past = history(batch, drop=k)
        items, labels = batch["items"][:, -k:], batch["labels"][:, -k:]
        one_by_one, memory = [], model.prefill(*past)
        for j in range(k):
            memory, logit = model.append(memory, items[:, j:j + 1], labels[:, j:j + 1])
            one_by_one.append(logit[:, 0])
        batched_memory, batched = model.append(model.prefill(*past), items, labels)
        torch.testing.assert_close(batched, torch.stack(one_by_one, 1), rtol=0, atol=1e-5)
        torch.testing.assert_close(model.score(batched_memory, items[:, :2]),
                                   model.score(memory, items[:, :2]), rtol=0, atol=1e-5)


def test_batched_append_is_not_inherited():
    """KIVI is Native's subclass, but its residual group flushes at append boundaries: a
    declaration holds for the class that makes it only."""
    assert Native.appends_in_batches() and not REGISTRY["kivi"].appends_in_batches()
    assert issubclass(REGISTRY["kivi"], Native)


@pytest.mark.parametrize("name,setting", CASES)
def test_measured_bytes_equal_closed_form(name, setting):
    """Bytes of a real one-user prefill equal `memory_bytes` x layers, payload alone and with
    metadata, at several history lengths."""
    model = build(name, setting, layers=2)
    for n_history in histories(setting):
        measured = measure_user_bytes(model, n_history)
        for metadata, key in ((False, "payload"), (True, "with_metadata")):
            formula = 2 * model.method.memory_bytes(model.cfg, model.hp, 2 * n_history, metadata)
            assert measured[key] == formula, (key, n_history)


@pytest.mark.parametrize("name,setting", CASES)
def test_closed_form_matmul_macs_match_flop_counter(name, setting):
    model = build(name, setting, layers=2)
    for n_history, q in ((5, 1), (16, 3), (max(setting.lengths) - 1, 1)):
        assert flop_counter_macs(model, n_history, q) == \
            closed_form_macs(model, n_history, q)["request_matmul"], (n_history, q)


@pytest.mark.parametrize("name,setting", cases(lambda cls: cls.compresses()))
def test_compressing_methods_keep_less_than_native(name, setting):
    """A method that exists to keep less keeps strictly fewer bytes per user (payload and
    metadata) than Native at the setting's longest history; recompute methods keep none."""
    model = build(name, setting, layers=2)
    n_history = max(setting.lengths) - 1
    kept = measure_user_bytes(model, n_history)["with_metadata"]
    native = measure_user_bytes(tiny_model("native", layers=2), n_history)["with_metadata"]
    assert kept < native, f"{name} keeps {kept} bytes, Native {native}"
    if model.method.recompute:
        assert kept == 0
