"""CollectiveKV (docs/methods/collectivekv.md): its equivalences and properties. fp32, dropout 0."""

import pytest
import torch

from malloc_ray import cli
from malloc_ray.errors import InputError
from malloc_ray.methods import REGISTRY
from malloc_ray.methods.collective import WEIGHT_DTYPE, CollectiveKV, index_dtype
from malloc_ray.metrics.cost import PAPER_SCALE, cost_table
from malloc_ray.model.hstu import HSTUConfig
from model_fixtures import history, random_batch, tiny_model

SETTINGS = CollectiveKV.__dict__["test_settings"]
IDS = [s.id for s in SETTINGS]


def serve(model, batch, drop=1):
    return model.score(model.prefill(*history(batch, drop)), batch["items"][:, -1:])[:, 0]


def mixer_inputs(model, batch):
    """The input x of every layer's mixer in the training forward."""
    seen = []
    hooks = [b.mixer.register_forward_hook(lambda m, args, out: seen.append(args[0]))
             for b in model.blocks]
    with torch.no_grad():
        model.logits(batch)
    for h in hooks:
        h.remove()
    return seen


def test_registered_with_its_category_and_workflow():
    assert REGISTRY["collectivekv"] is CollectiveKV
    assert (CollectiveKV.category, CollectiveKV.workflow) == ("head", "trained")


@pytest.mark.parametrize("usr_dim", [32, 100])
def test_without_a_global_part_it_is_native(usr_dim):
    """usr_dim >= d: no pool, no router; K, V = SiLU(W x) with f1 laid out as Native's
    (u, q, k, v), so Native's weights load as they are and the logits are Native's."""
    native = tiny_model("native", seed=1)
    model = tiny_model("collectivekv", seed=2, hparams={"usr_dim": usr_dim, "pool_size": 50})
    assert not any("pool" in k or "router" in k for k in model.state_dict())
    model.load_state_dict(native.state_dict(), strict=True)
    batch = random_batch((19, 7, 12, 19, 4), seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(batch), native.logits(batch), rtol=0, atol=0)
    # Native's request sums the cache's and the own token's attention parts, this one
    # attends over their concatenation: the same sums grouped differently, equal to rounding
    torch.testing.assert_close(serve(model, batch), serve(native, batch), rtol=0, atol=1e-6)
    # stores K, V (user parts of full width) and no index or weight: Native's payload bytes
    memory = model.prefill(*history(batch))
    assert set(memory.layers[0].payload) == {"k_usr", "v_usr"}
    assert memory.nbytes(True) == native.prefill(*history(batch)).nbytes(True)


def test_route_is_the_top1_of_the_router_softmax_with_its_weight_rounded_straight_through():
    cfg = HSTUConfig(d_model=32, num_heads=4, dropout=0.0)
    torch.manual_seed(0)
    mixer = CollectiveKV(cfg, CollectiveKV.Hparams(usr_dim=3, pool_size=40))
    x = torch.randn(3, 11, 32)
    index, weight = mixer.route(mixer.router_k, x)
    logits = x @ mixer.router_k.weight.T                      # plain reference
    probs = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    ref_index = logits.argmax(-1)
    ref_weight = probs.gather(-1, ref_index[..., None])[..., 0]
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(weight, ref_weight.to(WEIGHT_DTYPE).float(), rtol=0, atol=1e-7)
    assert torch.equal(weight, weight.to(WEIGHT_DTYPE).float())  # exactly a stored value
    # the gradient is the unrounded probability's: the rounding is straight-through
    grad = torch.autograd.grad(weight.sum(), mixer.router_k.weight)[0]
    ref_grad = torch.autograd.grad(torch.softmax(mixer.router_k(x), -1)
                                   .gather(-1, index[..., None]).sum(), mixer.router_k.weight)[0]
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-7)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_routing_is_deterministic_and_serving_picks_trainings_rows(setting):
    """The indices stored by a prefill are those the training forward picks for the same
    tokens, again on a second prefill, and for a user alone as inside a batch."""
    model = tiny_model("collectivekv", seed=3, hparams=setting.hparams)
    batch = random_batch(setting.lengths, seed=3)
    items, labels, lengths = history(batch)
    memory = model.prefill(items, labels, lengths)
    again = model.prefill(items, labels, lengths)
    inputs = mixer_inputs(model, batch)
    n = items.shape[1] * 2
    for layer, x in enumerate(inputs):
        stored = memory.layers[layer]
        valid = stored.metadata["valid"]
        with torch.no_grad():
            for kind in ("k", "v"):
                index, weight = model.blocks[layer].mixer.route(
                    getattr(model.blocks[layer].mixer, f"router_{kind}"), x[:, :n])
                assert torch.equal(stored.payload[f"{kind}_index"].long()[valid], index[valid])
                assert torch.equal(stored.payload[f"{kind}_weight"].float()[valid], weight[valid])
                assert torch.equal(again.layers[layer].payload[f"{kind}_index"],
                                   stored.payload[f"{kind}_index"])
    for user in range(len(setting.lengths)):
        n_hist = int(lengths[user])
        if n_hist == 0:
            continue
        alone = model.prefill(items[user:user + 1, -n_hist:], labels[user:user + 1, -n_hist:],
                              lengths[user:user + 1])
        for layer in range(len(model.blocks)):
            for kind in ("k", "v"):
                key = f"{kind}_index"
                assert torch.equal(alone.layers[layer].payload[key][0],
                                   memory.layers[layer].payload[key][user, -2 * n_hist:])


def test_index_dtype_is_the_smallest_that_holds_the_pool():
    cases = {1: torch.uint8, 256: torch.uint8, 257: torch.int16, 10_000: torch.int16,
             32_768: torch.int16, 32_769: torch.int32, 2**31: torch.int32}
    for pool, dtype in cases.items():
        assert index_dtype(pool) == dtype, pool
        assert torch.iinfo(dtype).max >= pool - 1
    with pytest.raises(ValueError):
        index_dtype(2**31 + 1)


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_stored_indices_and_weights_are_compact_and_the_pool_is_read(setting):
    """Each setting really shares: indices in the pool's dtype pointing at several rows,
    fp16 weights, user parts usr_dim wide; a request reads the pool (changing the chosen
    rows changes the score) and the history's user parts."""
    model = tiny_model("collectivekv", seed=4, hparams=setting.hparams)
    hp = model.hp
    batch = random_batch(setting.lengths, seed=4)
    memory = model.prefill(*history(batch))
    for layer in memory.layers:
        p = layer.payload
        assert p["k_usr"].shape[-1] == p["v_usr"].shape[-1] == hp.usr_dim
        for kind in ("k", "v"):
            index = p[f"{kind}_index"]
            assert index.dtype == index_dtype(hp.pool_size)
            assert int(index.long().max()) < hp.pool_size
            assert index[layer.metadata["valid"]].unique().numel() > 1
            assert p[f"{kind}_weight"].dtype == WEIGHT_DTYPE
    before = serve(model, batch)
    used = memory.layers[0].payload["v_index"][memory.layers[0].metadata["valid"]].long()
    with torch.no_grad():
        model.blocks[0].mixer.pool_v[used] += 0.5
    assert (serve(model, batch) - before).abs().max() > 1e-4


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_append_agrees_with_forward(setting):
    """Prefill all but the last k interactions, append k - 1 of them, then score the target:
    the appended items' logits (scored before their labels) and the target's equal the
    training forward's."""
    model = tiny_model("collectivekv", seed=5, hparams=setting.hparams)
    batch = random_batch(setting.lengths, seed=5)
    k = 4
    with torch.no_grad():
        full = model.logits(batch)
    memory = model.prefill(*history(batch, k))
    new_items, new_labels = batch["items"][:, -k:-1], batch["labels"][:, -k:-1]
    long_enough = batch["lengths"] >= k  # shorter users would append padding as interactions
    memory, item_logits = model.append(memory, new_items, new_labels)
    torch.testing.assert_close(item_logits[long_enough], full[:, -k:-1][long_enough],
                               rtol=0, atol=1e-5)
    target = model.score(memory, batch["items"][:, -1:])[:, 0]
    torch.testing.assert_close(target[long_enough], full[long_enough, -1], rtol=0, atol=1e-5)
    # and the appended memory holds the same bytes as a prefill of the same history
    assert memory.nbytes(True) == model.prefill(*history(batch)).nbytes(True)


def test_training_sends_gradient_to_the_routers_and_only_the_chosen_pool_rows():
    model = tiny_model("collectivekv", seed=6, hparams={"usr_dim": 2, "pool_size": 200}).train()
    batch = random_batch((12, 9, 5), seed=6)
    model.loss(batch).backward()
    mixer = model.blocks[0].mixer
    assert mixer.router_k.weight.grad.abs().sum() > 0
    assert mixer.router_v.weight.grad.abs().sum() > 0
    with torch.no_grad():
        x = mixer_inputs(model, batch)[0]
        chosen = mixer.route(mixer.router_k, x)[0].unique()
    touched = mixer.pool_k.grad.abs().sum(-1).nonzero()[:, 0]
    assert len(touched) > 1 and set(touched.tolist()) <= set(chosen.tolist())


@pytest.mark.parametrize("bad", [{"usr_dim": 0}, {"usr_dim": True}, {"usr_dim": 1.5},
                                 {"pool_size": 0}, {"pool_size": "10"}, {"pool_size": 2**31 + 1},
                                 {"pool": 3}])
def test_bad_hparams_are_rejected(bad):
    with pytest.raises(InputError):
        CollectiveKV.parse_hparams(bad)


def test_defaults_at_paper_scale_keep_at_most_2_percent_of_native_per_user(capsys):
    """d 256, 8 heads, 32 layers: per-user total bytes (payload + metadata) <= 2% of Native's
    at L = 1024 and 128; the pools are counted once per model, in `shared_bytes`."""
    for profile in ("kuaivideo", "amazon"):
        rows = {r["method"]: r for r in cost_table(profile)}
        ours, native = rows["collectivekv"], rows["native"]
        assert ours["kv_bytes_per_user"] <= 0.02 * native["kv_bytes_per_user"], profile
        assert ours["kv_payload_bytes_per_user"] < 0.008 * native["kv_payload_bytes_per_user"]
        cfg = HSTUConfig(**PAPER_SCALE)
        assert ours["shared_bytes"] == 32 * 2 * 1024 * 255 * 4 == \
            CollectiveKV.shared_bytes(cfg, CollectiveKV.Hparams())
        assert all(r["shared_bytes"] == 0 for name, r in rows.items() if name != "collectivekv")
    assert cli.main(["cost", "--profile", "kuaivideo"]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(line for line in lines if line.startswith("method"))
    assert head.split()[-2:] == ["shared", "MiB"]
    row = next(line for line in lines if line.startswith("collectivekv ")).split()
    assert row[-1] == f"{ours['shared_bytes'] / 2**20:.2f}"
