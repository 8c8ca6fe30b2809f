"""Per-user bytes are everything a server keeps for the user (payload + metadata), measured from
real tensors. For every registered method at the paper's width (d_model 256, 8 heads) and both
of its history lengths: the bytes of a one-user prefill equal the method's closed form,
`cost_summary` reports the total as `kv_bytes_per_user` and the payload beside it, and
`malloc-ray cost` prints 32 layers of the same closed forms.

Bytes are per layer, so 2 layers check the sum without 32 layers' prefill time (at L=1024 a
method's model and two prefills take about 1-4 s on one CPU core).
"""

from pathlib import Path

import pytest
import torch

from malloc_ray import cli
from malloc_ray.methods import method_names
from malloc_ray.metrics.cost import PAPER_SCALE, cost_summary, cost_table, measure_user_bytes
from malloc_ray.metrics.paper_compat import PROFILES
from malloc_ray.methods import get_method
from malloc_ray.model.ctr import CTRModel
from malloc_ray.model.hstu import HSTUConfig

LAYERS = 2
VOCAB = 100


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: a one-user prefill is many small ops (RWKV steps 2046 tokens one by
    one), which a thread pool slows down, by 100x on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def paper_width_model(method: str, max_len: int, layers: int = LAYERS) -> CTRModel:
    cfg = HSTUConfig(max_len=max_len, dropout=0.0, **{**PAPER_SCALE, "num_layers": layers})
    torch.manual_seed(0)
    return CTRModel(cfg, get_method(method), VOCAB).eval()


def mib(nbytes: int) -> str:
    """As `malloc-ray cost` prints it."""
    return f"{nbytes / 2**20:.2f}"


def closed_form(model: CTRModel, n_history: int, metadata: bool) -> int:
    """The model's bytes per user by formula: layers x the method's per-layer closed form for
    2 * n_history cached tokens (an item and a label token per interaction)."""
    per_layer = model.method.memory_bytes(model.cfg, model.hp, 2 * n_history, metadata)
    return model.cfg.num_layers * per_layer


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("method", method_names())
def test_measured_bytes_equal_closed_form_and_total_is_the_headline(method, profile):
    n_history = PROFILES[profile] - 1
    model = paper_width_model(method, PROFILES[profile])
    total, payload = closed_form(model, n_history, True), closed_form(model, n_history, False)
    assert measure_user_bytes(model, n_history) == {"payload": payload, "with_metadata": total}
    summary = cost_summary(model, n_history)
    assert summary["kv_bytes_per_user"] == total
    assert summary["kv_payload_bytes_per_user"] == payload


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_cost_table_prints_32_layers_of_the_closed_forms_total_first(profile, capsys):
    n_history = PROFILES[profile] - 1
    rows = {r["method"]: r for r in cost_table(profile)}
    assert set(rows) == set(method_names())
    for method, row in rows.items():
        # One layer is enough to read the per-layer closed form off the model's own hparams.
        model = paper_width_model(method, PROFILES[profile], layers=1)
        layers = PAPER_SCALE["num_layers"]
        assert row["kv_bytes_per_user"] == layers * closed_form(model, n_history, True), method
        assert row["kv_payload_bytes_per_user"] == layers * closed_form(model, n_history, False)
        assert row["kv_bytes_per_user"] >= row["kv_payload_bytes_per_user"], method
    # KIVI's fp32 residual window and quantizer scales are metadata: really counted.
    assert rows["kivi"]["kv_bytes_per_user"] > rows["kivi"]["kv_payload_bytes_per_user"]

    assert cli.main(["cost", "--profile", profile]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(line for line in lines if line.startswith("method"))
    assert head.index("total MiB") < head.index("payload MiB")
    kivi = next(line for line in lines if line.startswith("kivi ")).split()
    assert kivi[4:6] == [mib(rows["kivi"]["kv_bytes_per_user"]),
                         mib(rows["kivi"]["kv_payload_bytes_per_user"])]


def test_paper_compat_column_says_it_counts_payload(capsys):
    assert cli.main(["cost", "--profile", "amazon", "--paper-compat"]) == 0
    head = next(line for line in capsys.readouterr().out.splitlines()
                if line.startswith("method"))
    assert "paper-compat MiB (payload, paper's convention)" in head


def test_results_page_records_what_cost_prints():
    """docs/results.md's bytes table at the paper's scale is `cost_table`, rounded as printed."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "results.md").read_text()
    text = text.split("## The paper's Table 3", 1)[1]  # other sections have method rows too
    rows = {r["method"]: r for r in cost_table("kuaivideo")}
    amazon = {r["method"]: r for r in cost_table("amazon")}
    for method in method_names():
        line = next(l for l in text.splitlines() if l.startswith(f"| {method} | "))
        cells = [c.strip() for c in line.strip("|").split("|")][1:5]
        assert cells == [mib(rows[method]["kv_bytes_per_user"]),
                         mib(rows[method]["kv_payload_bytes_per_user"]),
                         mib(amazon[method]["kv_bytes_per_user"]),
                         mib(amazon[method]["kv_payload_bytes_per_user"])], method
