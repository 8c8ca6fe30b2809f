"""prepare: split protocol, content id, atomic writes, stats, CLI glue."""

import json

import pandas as pd
import pytest

from malloc_ray import cli
from malloc_ray.data import prepare as prep
from malloc_ray.data.prepare import dataset_stats, eval_count, format_stats, prepare, read_meta
from malloc_ray.errors import InputError

HEADER = "user,item,timestamp,label\n"


def _csv(tmp_path, rows, name="log.csv"):
    path = tmp_path / name
    path.write_text(HEADER + "".join(f"{r}\n" for r in rows))
    return path


def _synthetic(out, **kw):
    return prepare("synthetic", out, profile="kuaivideo", users=kw.pop("users", 30),
                   max_len=kw.pop("max_len", 32), **kw)


def test_split_protocol_and_order(tmp_path):
    # user 20: five interactions given out of time order, with a timestamp tie (file order wins)
    rows = ["20,7,5,1", "20,8,1,0", "9,3,1,0", "20,9,3,1", "9,4,2,1", "20,6,3,0", "9,5,3,1",
            "20,2,9,0"]
    meta = prepare("interactions", tmp_path / "ds", path=_csv(tmp_path, rows))
    users = pd.read_parquet(tmp_path / "ds" / "users.parquet")
    items = pd.read_parquet(tmp_path / "ds" / "items.parquet")
    assert users["raw_user"].tolist() == ["9", "20"]  # dense ids follow numeric raw order
    raw_item = dict(zip(items["item"], items["raw_item"]))
    assert [raw_item[i] for i in users["items"][1]] == ["8", "9", "6", "7", "2"]
    assert users["ts"][1].tolist() == [1, 3, 3, 5, 9]
    assert users["labels"][1].tolist() == [0, 1, 0, 1, 0]
    samples = pd.read_parquet(tmp_path / "ds" / "samples.parquet")
    got = samples[samples["user"] == 1]
    assert got["prefix_len"].tolist() == [1, 2, 3, 4]
    assert got["split"].tolist() == ["train", "train", "valid", "test"]
    assert (got["user_len"] == 5).all()
    assert samples[samples["user"] == 0]["split"].tolist() == ["valid", "test"]  # n = 3
    assert meta["splits"] == {"train": 2, "valid": 2, "test": 2}
    assert meta["stats"] == {"users": 2, "items": 8, "interactions": 8, "max_length": 5,
                             "avg_length": 4.0, "positive_rate": 0.5,
                             "label_stream_auc": None}  # both valid targets are positives
    assert meta["vocab_size"] == 9 and meta["dropped_users"] == 0
    assert read_meta(tmp_path / "ds") == meta


def test_max_seq_len_keeps_most_recent(tmp_path):
    rows = [f"1,{i + 1},{i},{i % 2}" for i in range(10)] + ["2,1,0,0", "2,2,1,1", "2,3,2,0"]
    meta = prepare("interactions", tmp_path / "ds", path=_csv(tmp_path, rows), max_seq_len=4)
    users = pd.read_parquet(tmp_path / "ds" / "users.parquet")
    assert users["ts"][0].tolist() == [6, 7, 8, 9]
    assert meta["stats"]["max_length"] == 4 and meta["source"]["max_seq_len"] == 4
    with pytest.raises(InputError, match="max_seq_len"):
        prepare("interactions", tmp_path / "ds2", path=_csv(tmp_path, rows), max_seq_len=2)


def test_short_user_is_an_error_naming_user_and_row(tmp_path):
    rows = ["1,1,1,1", "1,2,2,0", "1,3,3,1", "7,4,1,0", "7,5,2,1"]
    path = _csv(tmp_path, rows)
    with pytest.raises(InputError, match="user 7 has 2 interaction") as err:
        prepare("interactions", tmp_path / "ds", path=path)
    assert err.value.file == str(path) and err.value.row == 4
    assert not (tmp_path / "ds").exists()
    meta = prepare("interactions", tmp_path / "ds", path=path, drop_short_users=True)
    assert meta["dropped_users"] == 1 and meta["stats"]["users"] == 1


@pytest.mark.parametrize("row", ["1,-2,3,1", "1,2.5,3,1", "1,2,3,7", "1,2"])
def test_bad_input_leaves_no_output(tmp_path, row):
    path = _csv(tmp_path, ["1,1,1,1", "1,2,2,0", row, "1,3,3,1"])
    with pytest.raises(InputError) as err:
        prepare("interactions", tmp_path / "ds", path=path)
    assert err.value.row == 3 and str(path) in str(err.value)
    assert list(tmp_path.iterdir()) == [path]


def test_dataset_id_is_content_hash(tmp_path):
    a = _synthetic(tmp_path / "a", seed=1)
    b = _synthetic(tmp_path / "b", seed=1, name="other name")
    c = _synthetic(tmp_path / "c", seed=2)
    assert a["dataset_id"] == b["dataset_id"] != c["dataset_id"]
    assert len(a["dataset_id"]) == 16
    d = _synthetic(tmp_path / "d", seed=1, max_seq_len=10)
    assert d["dataset_id"] != a["dataset_id"]


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "ds"
    first = _synthetic(out, seed=1)
    with pytest.raises(InputError, match="already exists"):
        _synthetic(out, seed=2)
    assert read_meta(out)["dataset_id"] == first["dataset_id"]
    second = _synthetic(out, seed=2, overwrite=True)
    assert read_meta(out)["dataset_id"] == second["dataset_id"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temp or old dirs left
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not a dataset directory"):
        _synthetic(tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_failure_midway_is_atomic(tmp_path, monkeypatch):
    real_write = prep._write_files

    def write_then_fail(target, *args):
        real_write(target, *args)
        raise OSError("disk full")

    monkeypatch.setattr(prep, "_write_files", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        _synthetic(tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(prep, "_write_files", real_write)
    before = _synthetic(tmp_path / "ds", seed=1)
    monkeypatch.setattr(prep, "_write_files", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        _synthetic(tmp_path / "ds", seed=2, overwrite=True)
    assert read_meta(tmp_path / "ds") == before
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_stats_and_table(tmp_path):
    meta = _synthetic(tmp_path / "ds")
    row = dataset_stats(tmp_path / "ds")
    assert row == {"name": "synthetic-kuaivideo", "dataset_id": meta["dataset_id"],
                   **meta["stats"]}
    table = format_stats([row])
    assert "synthetic-kuaivideo" in table and "Positive rate" in table
    (tmp_path / "ds" / "meta.json").write_text(json.dumps({**meta, "format_version": 9}))
    with pytest.raises(InputError, match="format_version"):
        dataset_stats(tmp_path / "ds")
    with pytest.raises(InputError, match="no meta.json"):
        dataset_stats(tmp_path)


def test_real_ml100k(tmp_path, ml100k_inter):
    meta = prepare("movielens", tmp_path / "ml", path=ml100k_inter)
    assert meta["stats"]["users"] == 943 and meta["stats"]["interactions"] == 100_000
    assert meta["stats"]["items"] == 1682 and meta["stats"]["max_length"] == 737
    # each user's last 10% (at least one) are test targets, the 10% before them valid targets
    lengths = pd.read_csv(ml100k_inter, sep="\t").groupby("user_id:token").size().to_numpy()
    assert meta["splits"]["test"] == meta["splits"]["valid"] == int(eval_count(lengths).sum())
    assert meta["splits"]["test"] > 943
    # every interaction but each user's first is a target of exactly one split
    assert sum(meta["splits"].values()) == 100_000 - 943


# ---------------------------------------------------------------- CLI

def test_cli_prepare_and_stats(tmp_path, capsys):
    out = tmp_path / "k"
    assert cli.main(["data", "prepare", "synthetic", "--profile", "amazon", "--users", "20",
                     "--seed", "0", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["users"] == 20 and printed["dataset_id"] == read_meta(out)["dataset_id"]
    assert cli.main(["data", "stats", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "synthetic-amazon"
    assert cli.main(["data", "stats", str(out)]) == 0
    assert "synthetic-amazon" in capsys.readouterr().out
    assert cli.main(["data", "prepare", "synthetic", "--users", "5", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_bad_input_fails_without_output(tmp_path, capsys):
    path = _csv(tmp_path, ["1,1,1,1", "1,2,2,0", "1,x,3,1"])
    out = tmp_path / "ds"
    assert cli.main(["data", "prepare", "interactions", str(path), "--out", str(out)]) == 2
    assert f"{path}, row 3: non-integer item id" in capsys.readouterr().err
    inter = tmp_path / "x.inter"
    inter.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                     "1\t1\t5\t1\n1\t2\t5\t2\n1\t3\t5\t3\n2\t1\t3\t1\n")
    assert cli.main(["data", "prepare", "movielens", str(inter), "--out", str(out)]) == 2
    assert "user 2 has 1 interaction" in capsys.readouterr().err
    assert not out.exists()
    assert cli.main(["data", "prepare", "interactions", str(path), "--rating-col", "label",
                     "--out", str(out)]) == 2
    assert "rating_threshold" in capsys.readouterr().err
