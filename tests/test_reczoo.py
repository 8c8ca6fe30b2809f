"""reczoo x1/x2 readers: sequences rebuilt from fixtures in the exact formats, the real tiny
samples, bad rows named by file and line, and Table 1 from `data stats`."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SHARED_DATA
from reczoo_fixtures import (AMAZON_HEADER, KUAI_HEADER, MICRO_HEADER, amazon_reviews,
                             paper_truth, write_amazon_x1, write_kuaivideo_x1, write_longctr_x2,
                             write_microvideo_x1)

from malloc_ray import cli
from malloc_ray.data.prepare import build_sequences, prepare
from malloc_ray.data.sources import (PROFILES, read_amazon_x1, read_kuaivideo_x1,
                                     read_longctr_x2, read_microvideo_x1)
from malloc_ray.data.sources import reczoo_csv
from malloc_ray.data.sources.reczoo import Layout, read_columns
from malloc_ray.errors import InputError

X1 = {"kuaivideo": (write_kuaivideo_x1, read_kuaivideo_x1),
      "microvideo": (write_microvideo_x1, read_microvideo_x1)}


def rebuilt(log) -> dict[int, tuple[list[int], list[int]]]:
    """Per raw user: (raw items, labels) in the order prepare stores them."""
    seqs = build_sequences(log)
    off = np.r_[0, np.cumsum(seqs.lengths)]
    return {int(u): (seqs.raw_items[seqs.items[a:b] - 1].tolist(), seqs.labels[a:b].tolist())
            for u, a, b in zip(seqs.raw_users, off[:-1], off[1:])}


def interleaved(log):
    """The log with its candidate-only rows put into the history, in their sort order (the
    old, leaking Amazon construction r0, n1, r1, ...)."""
    return dataclasses.replace(log, candidate=None)


def candidates_by_user(log) -> dict[int, list[tuple[int, int, int]]]:
    """Per raw user: (prefix_len, raw item, label) of each candidate-only row."""
    seqs = build_sequences(log)
    c = seqs.candidates
    out: dict[int, list[tuple[int, int, int]]] = {}
    for u, p, i, y in zip(c["user"], c["prefix_len"], c["item"], c["label"]):
        out.setdefault(int(seqs.raw_users[u]), []).append(
            (int(p), int(seqs.raw_items[i - 1]), int(y)))
    return out


# ---------------------------------------------------------------- rebuilt sequences

@pytest.mark.parametrize("profile", sorted(X1))
def test_x1_rows_rebuild_each_users_full_sequence(tmp_path, profile):
    # max_len 400: most users have > 100 earlier clicks or non-clicks, so the history columns
    # are capped (KuaiVideo: the earliest 100) and cannot be what the sequence comes from.
    truth = paper_truth(profile, 12, max_len=400, seed=1)
    write, read = X1[profile]
    write(tmp_path / profile, truth)
    log = read(tmp_path / profile)
    assert len(log) == len(truth.user)
    assert rebuilt(log) == truth.by_user()
    assert max(len(items) for items, _ in truth.by_user().values()) > 200


def test_amazon_x1_rebuilds_reviews_and_negatives_from_histories(tmp_path):
    reviews = amazon_reviews(40, seed=2)
    truth = write_amazon_x1(tmp_path / "amz", reviews, seed=2)
    log = read_amazon_x1(tmp_path / "amz")
    assert rebuilt(interleaved(log)) == truth.by_user()  # rows placed as DIN's histories say
    # the history is the reviews; every negative is a candidate beside review i, at prefix i
    assert rebuilt(log) == {u: (r, [1] * len(r)) for u, r in reviews.items()}
    want = {}
    for u, (items, labels) in truth.by_user().items():
        prefix = np.cumsum(labels) - np.asarray(labels)  # reviews before each row
        want[u] = [(int(p), i, 0) for p, i, y in zip(prefix, items, labels) if y == 0]
    assert candidates_by_user(log) == want
    # a user with n reviews: 2(n-1) rows in the files, 2n-1 interactions rebuilt
    rows = sum(len((tmp_path / "amz" / f).read_text().splitlines()) - 1
               for f in ("train.csv", "test.csv"))
    assert len(log) == rows + len(truth.by_user())


def test_longctr_x2_rebuilds_from_seq_len(tmp_path):
    truth = write_longctr_x2(tmp_path / "x2", paper_truth("kuaivideo", 8, max_len=200, seed=3))
    log = read_longctr_x2(tmp_path / "x2")
    assert rebuilt(log) == truth.by_user()


def test_ties_keep_file_order_and_files_are_read_in_order(tmp_path):
    # two interactions of user 5 in the same second, one in train.csv and one in test.csv
    d = tmp_path / "m"
    d.mkdir()
    (d / "train.csv").write_text(MICRO_HEADER + "\n5,10,1,1,100,,\n5,11,1,0,200,10,1\n")
    (d / "test.csv").write_text(MICRO_HEADER + "\n5,12,1,1,200,10,1\n5,9,1,0,50,,\n")
    assert rebuilt(read_microvideo_x1(d)) == {5: ([9, 10, 11, 12], [0, 1, 0, 1])}
    # --files picks and orders the files
    assert rebuilt(read_microvideo_x1(d, files=["test.csv", "train.csv"]))[5][0] == [9, 10, 12,
                                                                                       11]


# ---------------------------------------------------------------- real tiny samples

def _shared(*parts) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available at {path}")
    return path


def test_real_fuxictr_taobao_csv_parses_with_its_header():
    """The TaobaoAd tiny CSV is FuxiCTR's own layout, with a '^'-list that may be empty."""
    path = _shared("taobaoad-fuxictr-tiny", "train_sample.csv")
    layout = Layout("TaobaoAd", ids=("userid", "adgroup_id", "cate_id"), labels=("clk",),
                    lists=(("click_sequence",),))
    cols = read_columns(path, layout)
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    rows = [line.split(",") for line in lines[1:]]
    seq = [r[header.index("click_sequence")] for r in rows]
    assert len(cols["userid"]) == len(rows) == 100
    assert cols["clk"].sum() == 4
    assert cols["click_sequence.tokens"].tolist() == [len(s.split("^")) if s else 0 for s in seq]
    assert cols["adgroup_id"].tolist() == [int(r[header.index("adgroup_id")]) for r in rows]
    both = read_columns(path.parent, layout, files=["valid_sample.csv", "test_sample.csv"])
    assert len(both["userid"]) == 200


def test_real_din_amazon_sample_round_trips_through_amazon_x1(tmp_path):
    """DIN's remapped Amazon-Electronics rows (real ids): written the way DIN builds
    AmazonElectronics_x1, then rebuilt into each user's time-ordered reviews."""
    path = _shared("amazon-electronics-din-sample", "amazon_electronics_sample.csv")
    cols = read_columns(path, Layout("DIN sample", ids=("user_id", "item_id", "time",
                                                         "cate_id"), labels=(), lists=()))
    assert len(cols["user_id"]) == 100
    order = np.lexsort((np.arange(100), cols["time"], cols["user_id"]))  # DIN: by (user, time)
    reviews: dict[int, list[int]] = {}
    for u, i in zip(cols["user_id"][order].tolist(), cols["item_id"][order].tolist()):
        reviews.setdefault(u, []).append(i)
    reviews = {u: r for u, r in reviews.items() if len(r) >= 2}  # user 16 is cut to 1 row
    assert len(reviews) == 16
    cats = dict(zip(cols["item_id"].tolist(), cols["cate_id"].tolist()))
    truth = write_amazon_x1(tmp_path / "din", reviews, categories=cats)
    log = read_amazon_x1(tmp_path / "din")
    assert rebuilt(interleaved(log)) == truth.by_user()
    assert rebuilt(log) == {u: (r, [1] * len(r)) for u, r in reviews.items()}


# ---------------------------------------------------------------- bad rows

KUAI_OK = "1,7,100,1,0,0,,\n2,7,101,0,0,0,100,\n"


@pytest.mark.parametrize("bad, message", [
    ("3,7,102,0,0,0,100", "malformed row"),                      # 7 fields
    ("3,7,102,0,0,0,100,101,9", "malformed row"),                # 9 fields
    ("3,7,abc,0,0,0,100,101", "column 'item_id' is not an integer id"),
    ("3,x7,102,0,0,0,100,101", "column 'user_id' is not an integer id"),
    ("3,7,102,2,0,0,100,101", "label is not 0 or 1 in column 'is_click'"),
    ("3,7,102,0,0,5,100,101", "label is not 0 or 1 in column 'is_follow'"),
    ("3,7,-102,0,0,0,100,101", "negative id in column 'item_id'"),
    ("3,7,,0,0,0,100,101", "missing value in column 'item_id'"),
    ("3,7,102,0,0,0,100^^5,101", r"empty id \('\^\^'\)"),
    ("3,7,102,0,0,0,100,^101", "empty id .leading or trailing"),
    ("3,7,102,0,0,0,100^,101", "empty id .leading or trailing"),
    ("3,7,102,0,0,0,100^a,101", "other than a digit"),
    ("", "missing value in column 'timestamp'"),                # an empty line
])
def test_bad_kuaivideo_rows_name_file_and_line(tmp_path, bad, message):
    d = tmp_path / "kuai"
    d.mkdir()
    (d / "train.csv").write_text(KUAI_HEADER + "\n" + KUAI_OK)
    (d / "test.csv").write_text(KUAI_HEADER + "\n" + KUAI_OK + bad + "\n4,7,103,0,0,0,,\n")
    with pytest.raises(InputError, match=message) as err:
        prepare("kuaivideo_x1", tmp_path / "out", path=d)
    assert err.value.file == str(d / "test.csv") and err.value.row == 3
    assert "file line 4" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_bad_row_deep_in_a_big_file_gets_its_line(tmp_path, monkeypatch):
    monkeypatch.setattr(reczoo_csv, "_BLOCK_BYTES", 256)  # many blocks, parsed on several threads
    lines = [f"{t},{t % 7},{t + 10},{t % 2},0,0,{t}^{t + 1},{t + 2}" for t in range(3000)]
    for line_no, bad in ((2501, "1,2,3,0,0,0,4^^5,6"), (2702, "1,2,3"), (1203, "1,2,x,0,0,0,,")):
        rows = list(lines)
        rows[line_no - 2] = bad
        path = tmp_path / "train.csv"
        path.write_text(KUAI_HEADER + "\n" + "\n".join(rows) + "\n")
        with pytest.raises(InputError) as err:
            read_kuaivideo_x1(path)
        assert err.value.row == line_no - 1 and f"file line {line_no}" in str(err.value)


def test_paired_lists_must_have_equal_lengths(tmp_path):
    path = tmp_path / "micro.csv"
    path.write_text(MICRO_HEADER + "\n1,2,3,1,10,,\n1,4,3,0,11,2^5,3\n")
    with pytest.raises(InputError, match="'clicked_categories' has 1 ids but 'clicked_items' "
                                         "has 2") as err:
        read_microvideo_x1(path)
    assert err.value.row == 2


def test_amazon_positive_that_disagrees_with_the_history_is_named(tmp_path):
    d = tmp_path / "amz"
    d.mkdir()
    (d / "train.csv").write_text(AMAZON_HEADER + "\n1,9,20,1,10,1\n0,9,77,1,10,1\n"
                                 "1,9,99,1,10^20^30,1^1^1\n")
    (d / "test.csv").write_text(AMAZON_HEADER + "\n1,9,40,1,10^20^30,1^1^1\n")
    with pytest.raises(InputError, match="do not share one history") as err:
        read_amazon_x1(d)
    assert err.value.file == str(d / "train.csv") and err.value.row == 3


def test_header_of_another_layout_is_rejected(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(MICRO_HEADER + "\n1,2,3,1,10,,\n")
    with pytest.raises(InputError, match="not a KuaiVideo_x1 CSV.*'is_like'"):
        read_kuaivideo_x1(path)
    with pytest.raises(InputError, match="no such file in the dataset directory"):
        read_kuaivideo_x1(tmp_path)  # has train.csv but no test.csv


def test_short_user_error_names_the_file_it_is_in(tmp_path):
    d = tmp_path / "kuai"
    d.mkdir()
    (d / "train.csv").write_text(KUAI_HEADER + "\n1,7,100,1,0,0,,\n2,7,101,0,0,0,100,\n"
                                 "3,7,102,0,0,0,100,101\n")
    (d / "test.csv").write_text(KUAI_HEADER + "\n4,8,100,1,0,0,,\n")
    with pytest.raises(InputError, match="user 8 has 1 interaction") as err:
        prepare("kuaivideo_x1", tmp_path / "out", path=d)
    assert err.value.file == str(d / "test.csv") and err.value.row == 1


def test_x2_bad_values_name_file_and_row(tmp_path):
    truth = paper_truth("kuaivideo", 4, max_len=30, seed=4)
    d = tmp_path / "x2"
    write_longctr_x2(d, truth)
    table = pq.read_table(d / "valid.parquet").to_pydict()
    table["seq_len"][1] = 10_000
    pq.write_table(pa.table(table), d / "valid.parquet")
    with pytest.raises(InputError, match="seq_len .* longer than the user's full_item_seq") as e:
        read_longctr_x2(d)
    assert e.value.file == str(d / "valid.parquet") and e.value.row == 2


# ---------------------------------------------------------------- CLI and Table 1

@pytest.mark.parametrize("profile", ["kuaivideo", "microvideo"])
def test_stats_reproduce_table1_on_data_generated_to_it(tmp_path, capsys, profile):
    """x1 files generated with the paper's Table 1 shape (max length 1024, its mean length and
    positive rate): `data prepare` then `data stats` print exactly the generated sequences'
    statistics, and these match the paper's row."""
    truth = paper_truth(profile, 40, seed=5)
    raw = tmp_path / {"kuaivideo": "KuaiVideo_x1", "microvideo": "MicroVideo1.7M_x1"}[profile]
    X1[profile][0](raw, truth)
    out = tmp_path / "ds"
    assert cli.main(["data", "prepare", f"{profile}_x1", str(raw), "--out", str(out),
                     "--max-seq-len", "1024"]) == 0
    err = capsys.readouterr().err
    assert "[####################] 100%" in err  # the progress bar's last line
    assert cli.main(["data", "stats", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["name"] == raw.name  # the directory's name, dots and all
    lengths = np.bincount(np.unique(truth.user, return_inverse=True)[1])
    assert stats["users"] == 40 and stats["interactions"] == len(truth.user)
    assert stats["items"] == len(np.unique(truth.item))
    assert stats["max_length"] == lengths.max() <= 1024
    assert stats["avg_length"] == pytest.approx(lengths.mean(), abs=1e-4)
    assert stats["positive_rate"] == pytest.approx(truth.label.mean(), abs=1e-4)
    paper = PROFILES[profile]
    assert stats["avg_length"] == pytest.approx(paper.avg_length, rel=0.1)
    assert stats["positive_rate"] == pytest.approx(paper.positive_rate, abs=0.02)
    assert cli.main(["data", "stats", str(out)]) == 0
    table = capsys.readouterr().out
    for column in ("Users", "Items", "Interactions", "Max length", "Avg length", "Positive rate"):
        assert column in table


def test_cli_bad_row_exits_2_without_output(tmp_path, capsys):
    d = tmp_path / "amz"
    write_amazon_x1(d, amazon_reviews(5))
    with open(d / "test.csv", "a") as f:
        f.write("1,4,7,3,5^^6,1^1\n")
    lines = len((d / "test.csv").read_text().splitlines())
    out = tmp_path / "ds"
    assert cli.main(["data", "prepare", "amazon_x1", str(d), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{d / 'test.csv'}, row {lines - 1}:" in err and f"file line {lines}" in err
    assert not out.exists() and not list(tmp_path.glob("ds.tmp-*"))
