"""Source readers: synthetic profiles and their planted signal; log validation with file/row."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from malloc_ray.data.sources import PROFILES, generate, item_category, read_inter, read_log
from malloc_ray.errors import InputError


# ---------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_per_seed():
    a, b = generate("kuaivideo", 40, max_len=64, seed=3), generate("kuaivideo", 40, max_len=64,
                                                                   seed=3)
    for field in ("user", "item", "label", "ts"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    c = generate("kuaivideo", 40, max_len=64, seed=4)
    assert len(c) != len(a) or not np.array_equal(c.item, a.item)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_synthetic_matches_paper_table1(profile):
    prof = PROFILES[profile]
    log = generate(profile, 200, seed=0)
    lengths = np.bincount(log.user)
    assert lengths.min() >= 3 and lengths.max() <= prof.max_length
    assert lengths.mean() == pytest.approx(prof.avg_length, rel=0.05)
    assert log.label.mean() == pytest.approx(prof.positive_rate, abs=0.02)
    assert log.item.min() >= 1 and log.item.max() <= 100


def test_synthetic_max_len_scales_lengths_down():
    log = generate("kuaivideo", 300, max_len=128, seed=0)
    lengths = np.bincount(log.user)
    assert lengths.max() <= 128
    assert lengths.mean() == pytest.approx(416 * 128 / 1024, rel=0.05)


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(InputError, match="profile"):
        generate("netflix", 10)
    with pytest.raises(InputError, match="max_len"):
        generate("amazon", 10, max_len=2)
    with pytest.raises(InputError, match="items"):
        generate("amazon", 10, items=20, categories=30)


def _category_click_rates(log, categories, window=None):
    """Per interaction t (t >= 1): smoothed click rate of t's category among the user's earlier
    interactions (all of them, or only the last `window`), from one-hot cumulative sums."""
    cat = item_category(log.item, categories)
    onehot = np.zeros((len(cat), categories))
    onehot[np.arange(len(cat)), cat] = 1
    seen = np.vstack([np.zeros(categories), np.cumsum(onehot, axis=0)])  # seen[t] = before t
    clicked = np.vstack([np.zeros(categories), np.cumsum(onehot * log.label[:, None], axis=0)])
    t = np.arange(len(cat))
    user_start = np.searchsorted(log.user, log.user)
    lo = user_start if window is None else np.maximum(user_start, t - window)
    n = seen[t, cat] - seen[lo, cat]
    k = clicked[t, cat] - clicked[lo, cat]
    target = t > user_start
    return ((k + 0.17) / (n + 1))[target], log.label[target]


def test_synthetic_label_needs_long_range_history():
    """A count estimator of the target category's click rate: the full history must beat the
    last 8 interactions clearly (the signal a long-sequence model can use and a short one
    cannot)."""
    log = generate("kuaivideo", 300, max_len=128, seed=0)
    full, y = _category_click_rates(log, 50)
    last8, _ = _category_click_rates(log, 50, window=8)
    auc_full, auc_last8 = roc_auc_score(y, full), roc_auc_score(y, last8)
    assert auc_full > 0.7
    assert auc_full - auc_last8 >= 0.05, (auc_full, auc_last8)


# ---------------------------------------------------------------- interactions

def _csv(tmp_path, text, name="log.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = "user,item,timestamp,label\n1,10,100,1\n1,11,101,0\n2,10,50,0\n"


def test_reads_csv_log(tmp_path):
    log = read_log(_csv(tmp_path, GOOD))
    np.testing.assert_array_equal(log.user, [1, 1, 2])
    np.testing.assert_array_equal(log.item, [10, 11, 10])
    np.testing.assert_array_equal(log.label, [1, 0, 0])
    np.testing.assert_array_equal(log.ts, [100, 101, 50])
    assert log.sort_key is None


def test_custom_columns_and_rating_threshold(tmp_path):
    path = _csv(tmp_path, "uid\tiid\tr\tt\n5\t7\t4.5\t1.5\n5\t8\t2\t1.25\n", name="log.tsv")
    log = read_log(path, user_col="uid", item_col="iid", time_col="t", label_col=None,
                   rating_col="r", rating_threshold=4)
    np.testing.assert_array_equal(log.label, [1, 0])
    np.testing.assert_array_equal(log.ts, [1, 1])
    np.testing.assert_array_equal(log.sort_key, [1.5, 1.25])  # fractions still order time


@pytest.mark.parametrize("text, row, message", [
    ("user,item,timestamp,label\n1,10,100,1\n1,11,101\n", 2, "malformed row"),
    ("user,item,timestamp,label\n1,10,100,1\n1,11,101,0,9\n", 2, "malformed row"),
    ("user,item,timestamp,label\n1,10,100,1\n\n1,11,101,0\n", 2, "missing value"),  # empty
    ("user,item,timestamp,label\n1,10,100,1\n1,,101,0\n", 2, "missing value"),
    ("user,item,timestamp,label\n1,10,100,1\n1,11,101,0\n-3,11,101,0\n", 3, "negative user id"),
    ("user,item,timestamp,label\n1,10,100,1\n1,-11,101,0\n", 2, "negative item id"),
    ("user,item,timestamp,label\n1,10,100,1\n1,1.5,101,0\n", 2, "non-integer item id"),
    ("user,item,timestamp,label\nbob,10,100,1\n", 1, "non-integer user id"),
    ("user,item,timestamp,label\n1,10,100,1\n1,11,101,2\n", 2, "not 0 or 1"),
    ("user,item,timestamp,label\n1,10,100,1\n1,11,yesterday,0\n", 2, "non-numeric timestamp"),
])
def test_bad_csv_rows_name_file_and_row(tmp_path, text, row, message):
    path = _csv(tmp_path, text)
    with pytest.raises(InputError, match=message) as err:
        read_log(path)
    assert err.value.file == str(path) and err.value.row == row
    assert f"{path}, row {row}" in str(err.value)


def test_row_numbers_count_across_batches(tmp_path, monkeypatch):
    from malloc_ray.data.sources import interactions

    monkeypatch.setattr(interactions, "_CSV_BLOCK_BYTES", 64)  # a few rows per batch
    monkeypatch.setattr(interactions, "_BATCH_ROWS", 3)
    rows = [f"{u},{u + 1},{u},1" for u in range(50)]
    rows[41] = "7,8,9,5"
    path = _csv(tmp_path, "user,item,timestamp,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(InputError, match="not 0 or 1") as err:
        read_log(path)
    assert err.value.row == 42
    rows[41] = "7,8"
    with pytest.raises(InputError, match="malformed row .file line 43.") as err:
        read_log(_csv(tmp_path, "user,item,timestamp,label\n" + "\n".join(rows) + "\n"))
    assert err.value.row == 42
    pq.write_table(pa.table({"user": list(range(50)), "item": [1] * 49 + [-1],
                             "timestamp": list(range(50)), "label": [0] * 50}),
                   tmp_path / "log.parquet")
    with pytest.raises(InputError, match="negative item id") as err:
        read_log(tmp_path / "log.parquet")
    assert err.value.row == 50


def test_missing_column_and_file(tmp_path):
    with pytest.raises(InputError, match="column 'label' not found") as err:
        read_log(_csv(tmp_path, "user,item,timestamp\n1,2,3\n"))
    assert err.value.key == "label"
    with pytest.raises(InputError, match="no such file"):
        read_log(tmp_path / "absent.csv")


def test_parquet_log_typed_columns(tmp_path):
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user": [1, 1, 2], "item": [3, 4, 3], "timestamp": [1.0, 2.0, 3.0],
                             "label": [1, 0, 1]}), path)
    log = read_log(path)
    np.testing.assert_array_equal(log.item, [3, 4, 3])
    np.testing.assert_array_equal(log.ts, [1, 2, 3])
    pq.write_table(pa.table({"user": [1, 1, -2], "item": [3, 4, 3], "timestamp": [1, 2, 3],
                             "label": [1, 0, 1]}), path)
    with pytest.raises(InputError, match="negative user id") as err:
        read_log(path)
    assert err.value.row == 3
    pq.write_table(pa.table({"user": [1], "item": [[3]], "timestamp": [1], "label": [True]}),
                   path)
    with pytest.raises(InputError, match="column 'item' has type list"):
        read_log(path)
    pq.write_table(pa.table({"user": [1, 1], "item": [3, 4], "timestamp": [1, 2],
                             "label": [True, False]}), path)
    np.testing.assert_array_equal(read_log(path).label, [1, 0])


# ---------------------------------------------------------------- movielens

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def test_movielens_inter_labels_by_threshold(tmp_path):
    path = _csv(tmp_path, INTER_HEADER + "1\t5\t4\t10\n1\t6\t3\t11\n", name="x.inter")
    np.testing.assert_array_equal(read_inter(path).label, [1, 0])
    np.testing.assert_array_equal(read_inter(path, rating_threshold=3).label, [1, 1])


def test_movielens_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="'rating' not in header"):
        read_inter(_csv(tmp_path, "user_id:token\titem_id:token\ttimestamp:float\n",
                        name="a.inter"))
    path = _csv(tmp_path, INTER_HEADER + "1\t5\t4\t10\n1\t5\tfour\t11\n", name="b.inter")
    with pytest.raises(InputError, match="non-numeric rating") as err:
        read_inter(path)
    assert err.value.row == 2
    path = _csv(tmp_path, INTER_HEADER + "1\t5\t4\t10\n-1\t5\t4\t11\n", name="c.inter")
    with pytest.raises(InputError, match=f"{path}, row 2: negative user id"):
        read_inter(path)
    path = _csv(tmp_path, INTER_HEADER + "1\t5\t4\n", name="d.inter")
    with pytest.raises(InputError, match="malformed row") as err:
        read_inter(path)
    assert err.value.row == 1


def test_real_ml100k_reads(ml100k_inter):
    log = read_inter(ml100k_inter)
    assert len(log) == 100_000 and len(np.unique(log.user)) == 943
    assert log.label.mean() == pytest.approx(0.5537, abs=1e-3)
