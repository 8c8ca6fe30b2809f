"""One place per concept: trial fields are validated in TrialConfig, the CLI's train flags are
derived from its fields, and every --smoke-test shrinks trials through malloc_ray/smoke.py."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from malloc_ray import cli, smoke
from malloc_ray.config import RULES, TrainConfig, TrialConfig
from malloc_ray.errors import InputError
from malloc_ray.study.spec import expand_cells, parse_spec


def test_a_new_trial_field_gets_its_flag():
    extended = dataclasses.make_dataclass("Extended", [("warmup_ratio", float, 0.25)],
                                          bases=(TrialConfig,))
    parser = argparse.ArgumentParser()
    names = cli.trial_flags(parser, extended)
    assert "warmup_ratio" in names and "hparams" not in names
    args = parser.parse_args(["--warmup-ratio", "0.5", "--max-len", "16", "--heads", "2",
                              "--no-silu-qkv"])
    assert (args.warmup_ratio, args.max_len, args.num_heads, args.silu_qkv) == (0.5, 16, 2, False)
    with pytest.raises(SystemExit):  # typed from the field's default
        parser.parse_args(["--warmup-ratio", "lots"])


def test_every_scalar_trial_field_is_a_train_flag():
    parser = argparse.ArgumentParser()
    names = set(cli.trial_flags(parser))
    fields = {f.name for f in dataclasses.fields(TrialConfig)}
    assert names == fields - set(cli.NO_FLAG)


def test_trial_config_alone_validates_and_builds_the_train_config():
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= \
        {f.name for f in dataclasses.fields(TrialConfig)}
    assert set(RULES) <= {f.name for f in dataclasses.fields(TrialConfig)}
    cfg = TrialConfig(dataset="/d", lr=1e-3, eval_every_steps=7, embedding_l2=1e-5)
    train = cfg.train_config()
    assert (train.lr, train.eval_every_steps, train.embedding_l2) == (1e-3, 7, 1e-5)
    assert cfg.model_config().num_layers == cfg.depth
    for key, bad in (("lr_plateau_factor", 0.0), ("eval_every_steps", 0),
                     ("embedding_l2", -1.0), ("warmup_steps", -1), ("dropout", 1.0)):
        with pytest.raises(InputError) as err:
            TrialConfig(dataset="/d", **{key: bad})
        assert err.value.key == key


def test_smoke_means_one_thing(monkeypatch, tmp_path):
    calls = []
    real = smoke.trial_overrides
    monkeypatch.setattr(smoke, "trial_overrides", lambda raw: calls.append(1) or real(raw))
    spec = parse_spec({"name": "s", "datasets": {"d": {"path": "/x"}}, "methods": ["native"],
                       "depths": [1, 2, 4], "seeds": [0, 1]})
    cells = expand_cells(spec, {"d": "/x"}, smoke_test=True)
    assert len(calls) == len(cells) == 2
    assert all(c.config.to_dict().items() >= real({}).items() for c in cells)
    # `malloc-ray train --smoke-test` goes through the same function (it fails later, on the
    # missing dataset: the overrides were applied first)
    assert cli.main(["train", "--dataset", str(tmp_path / "none"), "--smoke-test"]) == 2
    assert len(calls) == 3
