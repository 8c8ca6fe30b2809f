"""The `sequences` source: S3-Rec/ICLRec item-sequence files with candidate-only negatives."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED_DATA

from malloc_ray import cli
from malloc_ray.data.loader import load_dataset, local_batches, resolve_loss_positions
from malloc_ray.data.prepare import prepare
from malloc_ray.errors import InputError

TOYS = SHARED_DATA / "amazon-toys-s3rec" / "Toys_and_Games.txt"


def _write(tmp_path, text: str):
    path = tmp_path / "seqs.txt"
    path.write_text(text)
    return path


def test_negatives_are_candidates_the_user_never_touched(tmp_path):
    lines = [f"{u} " + " ".join(str(10 * u + k) for k in range(1, 5 + u)) for u in range(1, 30)]
    path = _write(tmp_path, "\n".join(lines) + "\n")
    meta = prepare("sequences", tmp_path / "ds", path=str(path), negatives=3, seed=5)
    users = pd.read_parquet(tmp_path / "ds" / "users.parquet")
    items = dict(pd.read_parquet(tmp_path / "ds" / "items.parquet").values)
    samples = pd.read_parquet(tmp_path / "ds" / "samples.parquet")
    raw = {int(r.raw_user): [int(items[i]) for i in r.items] for r in users.itertuples()}
    assert raw == {u: [10 * u + k for k in range(1, 5 + u)] for u in range(1, 30)}  # no negatives
    assert (users["labels"].map(set) == {1}).all()
    for r in users.itertuples():
        own = samples[samples["user"] == r.user]
        n = len(r.items)
        assert own["prefix_len"].tolist() == [p for p in range(1, n) for _ in range(4)]
        pos, neg = own[own["label"] == 1], own[own["label"] == 0]
        assert pos["candidate"].tolist() == list(r.items[1:])  # each interaction, its own
        assert not set(neg["candidate"]) & set(r.items)  # never an item the user touched
    assert meta["candidates"] and meta["stats"]["positive_rate"] == 0.25
    again = prepare("sequences", tmp_path / "again", path=str(path), negatives=3, seed=5)
    assert again["dataset_id"] == meta["dataset_id"]  # seeded
    other = prepare("sequences", tmp_path / "other", path=str(path), negatives=3, seed=6)
    assert other["dataset_id"] != meta["dataset_id"]


def test_windows_put_the_candidate_last_and_keep_the_history(tmp_path):
    path = _write(tmp_path, "".join(f"{u} 1 2 3 4 5 6 7 8 9 10\n" for u in range(1, 4)) +
                  "9 20 21 22 23 24 25 26 27 28 29\n")
    prepare("sequences", tmp_path / "ds", path=str(path), negatives=1)
    ds = load_dataset(tmp_path / "ds")
    rows = ds.samples[ds.samples["split"] == "test"]
    items, labels = ds.targets(rows)
    batch = next(local_batches(ds, "test", len(rows), max_len=4))
    assert batch["items"][:, -1].tolist() == items.tolist()
    assert batch["labels"][:, -1].tolist() == labels.tolist()
    assert (batch["labels"][:, :-1] == 1).all()  # histories: interactions only
    # both candidates of a prefix share their history
    assert batch["items"][0, :-1].tolist() == batch["items"][1, :-1].tolist()
    with pytest.raises(InputError, match="loss_positions: last") as err:
        next(local_batches(ds, "train", 8, max_len=4, loss_positions="all"))
    assert err.value.key == "loss_positions"
    # the default, "auto", trains such a dataset on the target only: every train row, once
    auto = list(local_batches(ds, "train", 8, max_len=4, loss_positions="auto"))
    assert resolve_loss_positions(ds, "auto") == "last"
    assert sum(len(b["user"]) for b in auto) == ds.meta["splits"]["train"]


@pytest.mark.parametrize("text, line, what", [
    ("1 2 3 4\n2 5 x 7\n", 2, "not a non-negative integer: 'x'"),
    ("1 2 3 4\n\n2 5 6 7\n", 2, "empty line"),
    ("1 2 3 4\n2 5 6 7\n1 8 9 10\n", 3, "user 1 is listed twice (first on line 1)"),
    ("1 2 3 4\n2 5 -6 7\n", 2, "not a non-negative integer: '-6'"),
    ("1 2 3 4\n7\n", 2, "a user with no items"),
])
def test_bad_lines_fail_naming_file_and_line_and_write_nothing(tmp_path, capsys, text, line,
                                                               what):
    path = _write(tmp_path, text)
    out = tmp_path / "ds"
    assert cli.main(["data", "prepare", "sequences", str(path), "--out", str(out)]) == 2
    errors = [l for l in capsys.readouterr().err.splitlines() if "error" in l]
    assert len(errors) == 1 and f"{path}, row {line}: {what}" in errors[0]
    assert not out.exists() and not list(tmp_path.glob("ds.tmp-*"))


def test_real_toys_sequences_through_the_cli(tmp_path, capsys):
    if not TOYS.is_file():
        pytest.skip(f"real data not available at {TOYS}")
    out = tmp_path / "toys"
    assert cli.main(["data", "prepare", "sequences", str(TOYS), "--negatives", "1",
                     "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["users"] == 19_412 and printed["interactions"] == 167_597  # SOURCE.txt
    assert printed["max_length"] == 550 and printed["positive_rate"] == 0.5
    assert printed["label_stream_auc"] <= 0.55
    ds = load_dataset(out)
    assert len(ds.samples) == 2 * (167_597 - 19_412)
    assert np.array_equal(np.diff(ds.offsets), ds.samples.groupby("user")["user_len"].first())


# -- fresh negatives: the training split's negatives redrawn every pass ----------------------
def _seq_dataset(tmp_path, negatives=2):
    lines = [f"{u} " + " ".join(str(10 * u + k) for k in range(1, 6 + u % 7)) for u in range(1, 60)]
    prepare("sequences", tmp_path / "ds", path=str(_write(tmp_path, "\n".join(lines) + "\n")),
            negatives=negatives, seed=1)
    return load_dataset(tmp_path / "ds")


def _train_rows(batches):
    out = []
    for b in batches:
        for u, items, label in zip(b["user"].tolist(), b["items"].tolist(),
                                   b["labels"][:, -1].tolist()):
            out.append((u, tuple(i for i in items[:-1] if i), items[-1], label))
    return sorted(out)


def test_auto_redraws_only_what_the_dataset_drew_itself(tmp_path):
    from malloc_ray.data.loader import resolve_train_negatives

    ds = _seq_dataset(tmp_path)
    assert ds.meta["negatives"] == "uniform"
    assert resolve_train_negatives(ds, "auto") == "fresh"
    assert resolve_train_negatives(ds, "fixed") == "fixed"
    prepare("synthetic", tmp_path / "syn", profile="amazon", users=40, seed=0)
    logged = load_dataset(tmp_path / "syn")
    assert logged.meta["negatives"] is None
    assert resolve_train_negatives(logged, "auto") == "fixed"
    with pytest.raises(InputError, match="train_negatives"):
        resolve_train_negatives(logged, "fresh")


def test_fresh_negatives_are_new_untouched_items_each_pass_and_positives_stay(tmp_path):
    ds = _seq_dataset(tmp_path)
    args = dict(split="train", batch_size=16, max_len=6, shuffle=True)
    fixed = _train_rows(local_batches(ds, seed=0, negatives="fixed", **args))
    pass0 = _train_rows(local_batches(ds, seed=0, negatives="fresh", **args))
    pass1 = _train_rows(local_batches(ds, seed=1, negatives="fresh", **args))
    assert _train_rows(local_batches(ds, seed=0, negatives="fresh", **args)) == pass0  # seeded
    pos = lambda rows: [r for r in rows if r[3] == 1]
    assert pos(fixed) == pos(pass0) == pos(pass1)  # positives and every history unchanged
    assert [r[:2] for r in fixed] == [r[:2] for r in pass0]  # the same samples
    negs = lambda rows: [r[2] for r in rows if r[3] == 0]
    changed = np.mean(np.array(negs(pass0)) != np.array(negs(pass1)))
    assert changed > 0.9, changed  # a new draw, not the prepared one
    seen = {u: set() for u in range(len(ds.arrays.offsets) - 1)}
    for u in seen:
        seen[u] = set(ds.arrays.items[ds.arrays.offsets[u]:ds.arrays.offsets[u + 1]].tolist())
    for rows in (pass0, pass1):
        assert all(item not in seen[u] and 0 < item < ds.meta["vocab_size"]
                   for u, _, item, label in rows if label == 0)


def test_a_trial_records_and_applies_fresh_negatives(tmp_path):
    from malloc_ray.config import TrialConfig, config_hash
    from malloc_ray.train import trial

    ds = _seq_dataset(tmp_path)
    cfg = TrialConfig(dataset=str(tmp_path / "ds"), max_len=6, batch_size=16)
    assert cfg.to_dict()["train_negatives"] == "auto"  # in the config, so in the trial id
    train, valid, _ = trial.batch_factories(cfg, ds)
    assert _train_rows(train(0)) != _train_rows(train(1))
    fixed = TrialConfig(dataset=str(tmp_path / "ds"), max_len=6, batch_size=16,
                        train_negatives="fixed")
    assert config_hash(fixed, "d") != config_hash(cfg, "d")
    _, valid_fixed, _ = trial.batch_factories(fixed, ds)
    assert _train_rows(valid()) == _train_rows(valid_fixed())  # evaluation never redraws
