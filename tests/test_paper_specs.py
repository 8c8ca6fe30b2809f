"""The paper's experiment specs: hyperparameters as the paper states them, their real-data
recipes valid on files in the exact reczoo formats, and their --smoke-test (plus the Table 2
studies on real data, docs/results.md) run end to end on local Ray."""

from pathlib import Path

import pandas as pd
import pytest
from reczoo_fixtures import (amazon_reviews, paper_truth, write_amazon_x1, write_kuaivideo_x1,
                             write_microvideo_x1)

from malloc_ray import cli
from malloc_ray.data.prepare import prepare, read_meta
from malloc_ray.errors import InputError
from malloc_ray.methods import method_names
from malloc_ray.study.spec import expand_cells, load_spec, parse_spec, smoke_spec

REPO = Path(__file__).resolve().parents[1]
TABLE2 = REPO / "experiments" / "paper_table2.yaml"
DEPTH = REPO / "experiments" / "depth_scaling.yaml"
TABLE2_STUDIES = {name: REPO / "experiments" / f"{name}_table2.yaml"
                  for name in ("ml100k", "toys", "longhist")}
PAPER_MAX_LEN = {"amazon": 128, "microvideo": 1024, "kuaivideo": 1024}  # section 4.1


def test_paper_specs_carry_the_papers_settings():
    for path in (TABLE2, DEPTH):
        spec = load_spec(path)
        assert set(spec.methods) == set(method_names()), path  # every registered method
        assert spec.seeds == [0, 1, 2]
        assert (spec.trial["d_model"], spec.trial["num_heads"], spec.trial["lr"]) == (256, 8,
                                                                                      5e-4)
        cells = expand_cells(spec, {d.name: f"/data/{d.name}" for d in spec.datasets})
        assert len(cells) == len(spec.datasets) * len(spec.methods) * len(spec.depths) * 3
        for cell in cells:
            assert cell.config.max_len == PAPER_MAX_LEN[cell.dataset]
        for ds in spec.datasets:  # sequences are cut to the paper's max length when prepared
            assert ds.prepare["max_seq_len"] == PAPER_MAX_LEN[ds.name]
    assert {d.name for d in load_spec(TABLE2).datasets} == set(PAPER_MAX_LEN)
    assert [d.name for d in load_spec(DEPTH).datasets] == ["amazon"]
    assert load_spec(DEPTH).depths == [1, 2, 4, 8, 16, 32]


WRITERS = {
    "kuaivideo_x1": lambda out: write_kuaivideo_x1(out, paper_truth("kuaivideo", 6,
                                                                    max_len=1500)),
    "microvideo_x1": lambda out: write_microvideo_x1(out, paper_truth("microvideo", 6,
                                                                      max_len=1500)),
    "amazon_x1": lambda out: write_amazon_x1(out, amazon_reviews(30, mean=150)),
}


def test_paper_recipes_prepare_files_in_the_reczoo_formats(tmp_path):
    """The specs' real recipes, pointed at fixture files in the exact x1 formats: they prepare,
    and users longer than the paper's max length are cut to it."""
    for ds in load_spec(TABLE2).datasets:
        recipe = dict(ds.prepare)
        source = recipe.pop("source")
        WRITERS[source](tmp_path / ds.name)
        recipe["path"] = str(tmp_path / ds.name)
        meta = prepare(source, tmp_path / f"{ds.name}-prepared", **recipe)
        assert meta["stats"]["max_length"] == PAPER_MAX_LEN[ds.name], ds.name


def test_smoke_section_is_validated_and_applied():
    raw = {"name": "s", "datasets": {"a": {"path": "/x"}}, "methods": ["native", "mqa"],
           "depths": [1, 2, 4], "trial": {"device": "cuda", "d_model": 64},
           "smoke": {"datasets": {"a": {"prepare": {"source": "synthetic"}}},
                     "methods": ["native"], "depths": [4], "trial": {"device": "cpu"}}}
    smoke = smoke_spec(parse_spec(raw))
    assert smoke.datasets[0].prepare == {"source": "synthetic"} and smoke.methods == ["native"]
    assert smoke.depths == [4] and smoke.trial == {"device": "cpu", "d_model": 64}
    unchanged = parse_spec({**raw, "smoke": None})
    assert smoke_spec(unchanged) is unchanged
    for bad, key in (({"epochs": 1}, "smoke.epochs"),
                     ({"datasets": {"b": {"path": "/y"}}}, "smoke.datasets.b"),
                     ({"methods": []}, "smoke.methods"),
                     ({"methods": ["nope"]}, None)):
        with pytest.raises(InputError) as err:
            smoke_spec(parse_spec({**raw, "smoke": bad}))
        assert key is None or err.value.key == key


# ---------------------------------------------------------------- smoke studies (local Ray)

# A smoke run checks the pipeline, not learning: a tiny model may end `no_learning`, which is a
# result like `ok` (anything else is a failure of the pipeline).
RAN = ("ok", "no_learning")


def _smoke(spec: Path, out: Path, capsys) -> pd.DataFrame:
    code = cli.main(["study", "run", str(spec), "--smoke-test", "--output-dir", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    return pd.read_parquet(out / f"{load_spec(spec).name}-smoke" / "trials.parquet")


@pytest.mark.slow
def test_paper_specs_pass_their_smoke_test(tmp_path, capsys, monkeypatch, local_ray):
    monkeypatch.chdir(REPO)  # recipe paths are relative to the repository root
    table = _smoke(TABLE2, tmp_path, capsys)
    assert sorted(table["dataset"]) == sorted(PAPER_MAX_LEN)
    assert table["status"].isin(RAN).all() and (table["method"] == "native").all()
    table = _smoke(DEPTH, tmp_path, capsys)
    assert sorted(table["depth"]) == [1, 32] and table["status"].isin(RAN).all()


def test_table2_studies_run_every_method_at_every_depth_with_the_baselines():
    for name, path in TABLE2_STUDIES.items():
        spec = load_spec(path)
        assert set(spec.methods) == set(method_names()), name
        assert spec.depths == [1, 2, 4] and spec.seeds == [0, 1, 2], name
        assert {"popularity", "cooc"} <= set(spec.baselines), name
        assert smoke_spec(spec).methods == ["native", "wo_mem"], name


@pytest.mark.slow
def test_table2_studies_pass_their_smoke_test(tmp_path, capsys, monkeypatch, local_ray,
                                              ml100k_inter, toys_sequences):
    """On the real files: every smoke cell runs, the baselines are rows, and Native and w/o Mem
    (one layer, cached and recomputed) give the same metrics for every (dataset, depth, seed)."""
    monkeypatch.chdir(REPO)
    for name, path in TABLE2_STUDIES.items():
        table = _smoke(path, tmp_path, capsys)
        assert {"popularity", "cooc"} <= set(table["method"]), name
        cells = table[table["method"].isin(["native", "wo_mem"])]
        assert cells["status"].isin(RAN).all() and cells["auc"].notna().all(), name
        pairs = cells.pivot_table(index=["dataset", "depth", "seed"], columns="method",
                                  values=["auc", "gauc", "logloss"])
        assert len(pairs) >= 1, name
        for metric in ("auc", "gauc", "logloss"):
            gap = (pairs[(metric, "native")] - pairs[(metric, "wo_mem")]).abs().max()
            assert gap <= 1e-6, (name, metric, gap)
    meta = read_meta(tmp_path / "ml100k_table2-smoke" / "data" / "ml100k")
    assert meta["stats"]["users"] == 943 and meta["stats"]["interactions"] == 100_000
