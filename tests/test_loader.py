"""Loader: window content and left padding, sample selection, Ray == local."""

from collections import Counter

import numpy as np
import pytest
import torch

from malloc_ray.data.loader import (collate, load_dataset, local_batches, ray_batches,
                                    ray_samples, resolve_loss_positions, select_samples)
from malloc_ray.data.prepare import eval_count, last_train_prefix, prepare
from malloc_ray.errors import InputError


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader") / "ds"
    prepare("synthetic", out, profile="kuaivideo", users=40, max_len=48, seed=0)
    return load_dataset(out)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _sequence(ds, user):
    lo, hi = ds.offsets[user], ds.offsets[user + 1]
    return ds.items[lo:hi], ds.labels[lo:hi]


def test_load_dataset_arrays(ds):
    users = ds.meta["stats"]["users"]
    assert len(ds.offsets) == users + 1 and ds.offsets[-1] == len(ds.items) == len(ds.labels)
    assert list(ds.samples.columns) == ["user", "prefix_len", "split", "user_len"]
    assert np.array_equal(np.diff(ds.offsets)[ds.samples["user"]], ds.samples["user_len"])


def test_collate_windows_are_left_padded_slices(ds):
    user = np.array([0, 3, 3, 5])
    n3, n5 = np.diff(ds.offsets)[[3, 5]]
    prefix = np.array([1, 2, n3 - 1, min(9, n5 - 1)])
    max_len = 6
    batch = collate(ds, user, prefix, max_len)
    assert set(batch) == {"items", "labels", "lengths", "user"}
    assert all(t.dtype == torch.int64 for t in batch.values())
    width = batch["items"].shape[1]
    assert width == max_len == int(batch["lengths"].max())
    for row, (u, p) in enumerate(zip(user, prefix)):
        items, labels = _sequence(ds, u)
        start = max(0, p - max_len + 1)
        n = p - start + 1
        assert batch["lengths"][row] == n
        assert batch["items"][row, width - n:].tolist() == items[start:p + 1].tolist()
        assert batch["labels"][row, width - n:].tolist() == labels[start:p + 1].tolist()
        assert batch["items"][row, :width - n].eq(0).all()
        assert batch["labels"][row, :width - n].eq(0).all()
        assert batch["labels"][row, -1] == labels[p]  # the target is the last column
    assert batch["user"].tolist() == user.tolist()


def test_batch_width_is_longest_window(ds):
    batch = collate(ds, [0, 1], [1, 2], max_len=50)
    assert batch["items"].shape == (2, 3) and batch["lengths"].tolist() == [2, 3]
    with pytest.raises(ValueError, match="outside"):
        collate(ds, [0], [np.diff(ds.offsets)[0]], max_len=50)


def test_select_samples_last_and_all(ds):
    max_len = 8
    valid = select_samples(ds, "valid", max_len)
    k = eval_count(valid["user_len"].to_numpy())
    assert ((valid["prefix_len"] >= valid["user_len"] - 2 * k)
            & (valid["prefix_len"] < valid["user_len"] - k)).all()
    assert len(valid) == ds.meta["splits"]["valid"]
    last = select_samples(ds, "train", max_len, "last")
    assert len(last) == ds.meta["splits"]["train"]
    ends = select_samples(ds, "train", max_len, "all")
    assert len(ends) < len(last)
    for user, rows in ends.groupby("user"):
        last = int(last_train_prefix([rows["user_len"].iloc[0]])[0])
        covered = Counter()
        for p in rows["prefix_len"]:
            covered.update(range(max(0, p - max_len + 1), p + 1))
        # every train target position 1..last lies in exactly one window, and nothing after it
        assert all(covered[i] == 1 for i in range(1, last + 1)), user
        assert set(covered) <= set(range(last + 1))
    with pytest.raises(InputError, match="split"):
        select_samples(ds, "dev", max_len)
    with pytest.raises(InputError, match="loss_positions"):
        select_samples(ds, "train", max_len, "some")


def test_local_batches_cover_split_and_shuffle_by_seed(ds):
    def keys(batches):
        return [(u, int(b["labels"].shape[1] - n)) for b in batches
                for u, n in zip(b["user"].tolist(), b["lengths"].tolist())]

    plain = list(local_batches(ds, "train", 32, 16))
    assert sum(len(b["user"]) for b in plain) == ds.meta["splits"]["train"]
    assert all(len(b["user"]) == 32 for b in plain[:-1])
    one = list(local_batches(ds, "train", 32, 16, shuffle=True, seed=1))
    again = list(local_batches(ds, "train", 32, 16, shuffle=True, seed=1))
    other = list(local_batches(ds, "train", 32, 16, shuffle=True, seed=2))
    assert all(torch.equal(a["items"], b["items"]) for a, b in zip(one, again))
    assert one[0]["user"].tolist() != other[0]["user"].tolist()
    assert len(list(local_batches(ds, "train", 32, 16, drop_last=True))) == len(plain) - (
        ds.meta["splits"]["train"] % 32 > 0)
    assert keys(plain) != keys(one)


def test_shuffled_batches_are_grouped_by_window_length(tmp_path):
    """Every sample once per pass, seeded, and batches of similar widths: the padded width of
    a shuffled pass is far below that of random batches on skewed history lengths."""
    out = tmp_path / "skewed"
    prepare("synthetic", out, profile="amazon", users=300, seed=1)  # avg 9, up to 128
    ds = load_dataset(out)
    assert resolve_loss_positions(ds, "auto") == "all"  # no candidates: every position
    rows = select_samples(ds, "train", 40, "last")
    grouped = list(local_batches(ds, "train", 16, 40, shuffle=True, seed=4))
    assert _rows(grouped) == _rows(local_batches(ds, "train", 16, 40))
    again = list(local_batches(ds, "train", 16, 40, shuffle=True, seed=4))
    assert all(torch.equal(a["items"], b["items"]) for a, b in zip(grouped, again))
    padded = sum(b["items"].numel() for b in grouped)
    widths = np.minimum(rows["prefix_len"].to_numpy(), 39) + 1
    rng = np.random.default_rng(0)
    random = sum(widths[rng.permutation(len(widths))][i:i + 16].max() * len(widths[i:i + 16])
                 for i in range(0, len(widths), 16))
    assert padded < 0.7 * random, (padded, random)
    first = [b["user"].tolist() for b in grouped[:3]]
    assert first != [b["user"].tolist() for b in local_batches(ds, "train", 16, 40, shuffle=True,
                                                               seed=5)][:3]


def _rows(batches):
    """Each sample's unpadded window, to compare sample multisets across batchings."""
    out = []
    for b in batches:
        for i, n in enumerate(b["lengths"].tolist()):
            out.append((int(b["user"][i]), tuple(b["items"][i, -n:].tolist()),
                        tuple(b["labels"][i, -n:].tolist())))
    return sorted(out)


def test_ray_batches_equal_local_batches(ds, ray_cluster):
    args = dict(split="train", batch_size=64, max_len=12, loss_positions="all")
    local = list(local_batches(ds, **args))
    via_ray = list(ray_batches(ds, **args))
    assert len(local) == len(via_ray)
    for a, b in zip(local, via_ray):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)  # same rows, same padding
    table = ray_samples(ds).materialize()  # what a trial gets via tune.with_parameters
    for split in ("valid", "train"):
        args = dict(split=split, batch_size=50, max_len=12)
        assert _rows(ray_batches(ds, samples=table, **args)) == _rows(local_batches(ds, **args))
    args = dict(split="train", batch_size=50, max_len=12, shuffle=True)
    shuffled = list(ray_batches(ds, samples=table, seed=3, **args))
    assert _rows(shuffled) == _rows(local_batches(ds, "train", 50, 12))
    again = list(ray_batches(ds, samples=table, seed=3, **args))
    assert all(torch.equal(a["user"], b["user"]) for a, b in zip(shuffled, again))
    unshuffled = next(local_batches(ds, "train", 50, 12))
    assert shuffled[0]["user"].tolist() != unshuffled["user"].tolist()
    first = shuffled[0]
    assert first["items"].shape[1] == int(first["lengths"].max())


def test_ray_batches_read_rows_selected_by_the_driver(ds, ray_cluster):
    """A study driver materializes each split's selected rows once; trials read them as they are."""
    for split, loss in (("train", "all"), ("valid", "last")):
        selected = ray_samples(ds, split, 12, loss).materialize()
        args = dict(split=split, batch_size=40, max_len=12, loss_positions=loss)
        assert _rows(ray_batches(ds, samples=selected, **args)) == _rows(local_batches(ds, **args))
    selected = ray_samples(ds, "train", 12, "last").materialize()
    args = dict(split="train", batch_size=40, max_len=12, shuffle=True)
    one = list(ray_batches(ds, samples=selected, seed=5, **args))
    assert _rows(one) == _rows(local_batches(ds, "train", 40, 12))
    assert one[0]["user"].tolist() != next(local_batches(ds, "train", 40, 12))["user"].tolist()


def test_ray_batches_redraw_fresh_negatives_like_the_local_loader(tmp_path, ray_cluster):
    """The Ray loader redraws a dataset's own negatives per batch: the same samples and
    positives as with fixed negatives, new untouched items for the negatives, the same draw
    for the same seed whatever thread collates a batch."""
    lines = [f"{u} " + " ".join(str(10 * u + k) for k in range(1, 6 + u % 5)) for u in range(1, 40)]
    path = tmp_path / "seqs.txt"
    path.write_text("\n".join(lines) + "\n")
    prepare("sequences", tmp_path / "seq", path=str(path), negatives=2, seed=0)
    seq = load_dataset(tmp_path / "seq")
    args = dict(split="train", batch_size=16, max_len=6, shuffle=True, seed=4)

    def rows(batches):
        return sorted((int(u), tuple(i for i in items if i), int(y)) for b in batches
                      for u, items, y in zip(b["user"], b["items"].tolist(), b["labels"][:, -1]))

    fixed = rows(local_batches(seq, **args))  # rows sorted: the two shuffles' orders differ
    fresh = rows(ray_batches(seq, negatives="fresh", **args))
    from malloc_ray.data.loader import _window_collate_class, touched_keys

    collate_fn = _window_collate_class()(seq.arrays, 6, (seq.meta["vocab_size"], 4, touched_keys(
        seq.arrays, seq.meta["vocab_size"])))
    part = {k: seq.samples[k].to_numpy()[:20] for k in ("user", "prefix_len", "candidate", "label")}
    assert torch.equal(collate_fn(part)["items"], collate_fn(dict(part))["items"])  # seeded by rows
    assert [r for r in fixed if r[2] == 1] == [r for r in fresh if r[2] == 1]
    assert [r[1][:-1] for r in fixed] != [] and sorted(r[1][:-1] for r in fixed) == sorted(
        r[1][:-1] for r in fresh)  # every history as it was
    assert sorted(r[1][-1] for r in fixed if r[2] == 0) != sorted(
        r[1][-1] for r in fresh if r[2] == 0)
    off, items = seq.arrays.offsets, seq.arrays.items
    assert all(r[1][-1] not in set(items[off[r[0]]:off[r[0] + 1]].tolist())
               for r in fresh if r[2] == 0)


def test_packed_evaluation_batches_hold_every_row_once_within_the_score_memory(ds):
    """Evaluation batches sorted by window width and packed up to the score memory of
    batch_size full windows: the same rows, and the same metrics as plain batches."""
    from malloc_ray.data.loader import packed_batches
    from malloc_ray.model.ctr import CTRModel
    from malloc_ray.model.hstu import HSTUConfig
    from malloc_ray.methods import get_method
    from malloc_ray.train.loop import evaluate

    widths = np.random.default_rng(0).integers(1, 41, 500)
    batches = packed_batches(widths, 4, 40)
    assert sorted(np.concatenate(batches).tolist()) == list(range(500))
    assert any(len(b) > 4 for b in batches)  # short windows share a batch
    for b in batches:
        assert len(b) <= 4 or len(b) * widths[b].max() ** 2 <= 4 * 40 ** 2
    for split in ("valid", "test"):
        plain = list(local_batches(ds, split, 4, 24))
        packed = list(local_batches(ds, split, 4, 24, packed=True))
        assert len(packed) < len(plain) and _rows(packed) == _rows(plain)
    torch.manual_seed(0)
    model = CTRModel(HSTUConfig(d_model=16, num_heads=2, num_layers=2, max_len=24),
                     get_method("native"), ds.meta["vocab_size"])
    want = evaluate(model, local_batches(ds, "valid", 4, 24))
    got = evaluate(model, local_batches(ds, "valid", 4, 24, packed=True))
    for key in ("auc", "gauc", "logloss"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert got["n"] == want["n"]
