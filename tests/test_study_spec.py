"""Study specs and resource requests: validation, cell expansion, GPU-fraction arithmetic."""

import pytest
import yaml

from malloc_ray.config import TrialConfig
from malloc_ray.errors import InputError
from malloc_ray.study.resources import estimate_peak_bytes, gpu_fraction, trial_resources
from malloc_ray.study.spec import expand_cells, load_spec, parse_spec

BASE = {"name": "s", "datasets": {"d": {"path": "/nowhere"}}, "methods": ["native", "gqa"],
        "depths": [1, 2], "seeds": [0, 1], "trial": {"d_model": 16}}


def test_quickstart_spec_loads_and_expands():
    spec = load_spec("experiments/quickstart.yaml")
    cells = expand_cells(spec, {"kuai": "/data/kuai"})
    assert len(cells) == len(spec.methods) * len(spec.depths) * len(spec.seeds)
    # >= 3 seeds: the report's intervals and paired verdicts need them
    assert len(spec.methods) >= 4 and len(spec.depths) >= 1 and len(spec.seeds) >= 3
    assert len({c.key for c in cells}) == len(cells)
    for method, hparams in spec.hparams.items():
        assert all(c.config.hparams == hparams for c in cells if c.config.method == method)


@pytest.mark.parametrize("path, value", [
    (("bogus",), 1),
    (("trial", "learning_rate"), 1e-3),
    (("datasets", "d", "url"), "x"),
    (("search", "strategy"), "x"),
    (("resources", "gpu"), 1),
])
def test_unknown_keys_are_errors_naming_the_key(path, value):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    node = raw
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    with pytest.raises(InputError) as err:
        parse_spec(raw, file="spec.yaml")
    assert path[-1] in str(err.value) and "spec.yaml" in str(err.value)


def test_bad_values_are_errors():
    with pytest.raises(InputError, match="method"):
        parse_spec({**BASE, "methods": ["native", "nope"]})
    with pytest.raises(InputError, match="kv_heads"):
        parse_spec({**BASE, "hparams": {"gqa": {"kv_head": 2}}})
    with pytest.raises(InputError, match="depths"):
        parse_spec({**BASE, "depths": []})
    with pytest.raises(InputError, match="overrides"):
        parse_spec({**BASE, "overrides": [{"match": {"colour": "red"}, "set": {}}]})


def test_overrides_and_smoke_test():
    spec = parse_spec({**BASE, "overrides": [
        {"match": {"method": "gqa", "depth": 2, "seed": 0}, "set": {"fault": "nan:1"}}]})
    cells = expand_cells(spec, {"d": "/data"})
    faulty = [c for c in cells if c.config.fault]
    assert [(c.config.method, c.config.depth, c.config.seed) for c in faulty] == [("gqa", 2, 0)]
    smoke = expand_cells(parse_spec({**BASE, "depths": [1, 2, 4, 8]}), {"d": "/data"},
                         smoke_test=True)
    assert {c.config.depth for c in smoke} == {1, 2} and {c.config.seed for c in smoke} == {0}
    assert all(c.config.epochs == 1 and c.config.max_steps_per_epoch for c in smoke)


def test_gpu_fraction_rounds_up_to_eighths():
    gib = 2**30
    assert gpu_fraction(1 * gib, 80 * gib) == 0.125          # tiny trials still take 1/8
    assert gpu_fraction(10 * gib, 80 * gib) == 0.125         # exactly 1/8
    assert gpu_fraction(10 * gib + 1, 80 * gib) == 0.25
    assert gpu_fraction(45 * gib, 80 * gib) == 0.625
    assert gpu_fraction(500 * gib, 80 * gib) == 1.0          # never more than one device
    with pytest.raises(ValueError):
        gpu_fraction(1, 0)


def test_resource_dicts_for_tune():
    small = TrialConfig(dataset="/d", d_model=32, depth=1, max_len=32, device="cuda")
    big = TrialConfig(dataset="/d", d_model=256, depth=8, max_len=1024, batch_size=64,
                      device="cuda")
    assert estimate_peak_bytes(big, 1000) > 10 * estimate_peak_bytes(small, 1000)
    gib = 2**30
    assert trial_resources(small, 1000, 1.0, "auto", 80 * gib) == {"cpu": 1.0, "gpu": 0.125}
    res = trial_resources(big, 1000, 2.0, "auto", 80 * gib)
    assert res["cpu"] == 2.0 and res["gpu"] == gpu_fraction(estimate_peak_bytes(big, 1000),
                                                            80 * gib)
    assert trial_resources(small, 1000, 1.0, 0.5, 80 * gib) == {"cpu": 1.0, "gpu": 0.5}
    cpu = TrialConfig(dataset="/d")
    assert trial_resources(cpu, 1000, 0.5, "auto", 80 * gib) == {"cpu": 0.5, "gpu": 0}
    assert trial_resources(small, 1000, 1.0, "auto", None) == {"cpu": 1.0, "gpu": 0}


def test_eval_batch_size_defaults_by_device_and_never_changes_the_trial_id():
    from malloc_ray.config import config_hash

    short = TrialConfig(dataset="/d", max_len=32, num_heads=4)
    long = TrialConfig(dataset="/d", max_len=512, num_heads=4)
    assert short.eval_batch_size == 64 and long.eval_batch_size == 4  # CPU: clamped to 4..64
    assert TrialConfig(dataset="/d", max_len=128, num_heads=4).eval_batch_size == 16
    assert TrialConfig(dataset="/d", max_len=512, device="cuda").eval_batch_size == 256
    assert TrialConfig(dataset="/d", eval_batch_size=7).eval_batch_size == 7  # set: kept
    same = [TrialConfig(dataset="/d", eval_batch_size=b, device=dev)
            for b, dev in ((None, "cpu"), (None, "cuda"), (3, "cpu"))]
    assert len({config_hash(c, "id") for c in same}) == 1
    assert config_hash(TrialConfig(dataset="/d", lr=2e-3), "id") != config_hash(same[0], "id")
    for bad in (0, "16", 2.5):
        with pytest.raises(InputError, match="eval_batch_size"):
            TrialConfig(dataset="/d", eval_batch_size=bad)
