"""The cheap cached request (Native's `step`, methods/common/glue.py), against the reference.

A request attends over [cache; own tokens] as two sums (no concatenation of the cache); an
append writes into spare capacity behind the cache. Each fast path is checked in fp32 against
the concatenating reference (`pointwise_attention_reference`, Native's `attend`), and the
memory against what a fresh prefill keeps.
"""

import pytest
import torch

from malloc_ray.methods.common.glue import (TokenMemory, distance_bias, distance_table,
                                            empty_grown, join_cached, pointwise_sum)
from malloc_ray.methods.heads import grouped_attention
from malloc_ray.model.hstu import RelativeBias, pointwise_attention_reference, relative_bucket
from model_fixtures import history, one_thread, random_batch, tiny_model  # noqa: F401

LENGTHS = [23, 9, 5, 17, 23, 12]  # left padding inside one batch


@pytest.mark.parametrize("buckets,far", [(32, 128), (8, 40)])
def test_distance_bias_equals_bucketing_every_pair(buckets, far):
    torch.manual_seed(0)
    rab = RelativeBias(num_heads=3, num_buckets=buckets, max_distance=far)
    dist = torch.tensor([-5, 0, 1, 7, far // 2, far - 1, far, far + 1, 3 * far, 100_000])
    dist = dist.view(1, 2, 5)
    want = rab.table(relative_bucket(dist, buckets, far)).permute(0, 3, 1, 2)
    torch.testing.assert_close(distance_bias(rab, dist), want, rtol=0, atol=0)
    torch.testing.assert_close(distance_bias(rab, dist, distance_table(rab, "cpu")), want,
                               rtol=0, atol=0)


@pytest.mark.parametrize("h_kv", [4, 2, 1])
def test_two_sums_equal_attention_over_the_concatenation(h_kv):
    """pointwise_sum(cache) + pointwise_sum(own), divided by n once, is the reference over
    [cache; own] (and GQA's grouped attention where K,V heads are shared)."""
    g = torch.Generator().manual_seed(1)
    b, h, nq, m, dh = 2, 4, 3, 7, 5
    q = torch.randn(b, h, nq, dh, generator=g)
    kc, vc = torch.randn(b, h_kv, m, dh, generator=g), torch.randn(b, h_kv, m, dh, generator=g)
    ko, vo = torch.randn(b, h_kv, nq, dh, generator=g), torch.randn(b, h_kv, nq, dh, generator=g)
    bias = torch.randn(b, h, nq, m + nq, generator=g)
    mask = torch.rand(b, 1, nq, m + nq, generator=g) > 0.3
    got = (pointwise_sum(q, kc, vc, bias[..., :m], mask[..., :m])
           + pointwise_sum(q, ko, vo, bias[..., m:], mask[..., m:])) / 6.0
    k, v = torch.cat([kc, ko], 2), torch.cat([vc, vo], 2)
    want = grouped_attention(q, k, v, bias, mask, 6.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if h_kv == h:
        torch.testing.assert_close(got, pointwise_attention_reference(q, k, v, bias, mask, 6.0),
                                   rtol=1e-5, atol=1e-6)


def reference_step(mixer, x, pos, memory):
    """Native's step as it was: attend over the concatenated cache and own tokens."""
    u, q, k, v = mixer.project(x)
    keys = torch.cat([memory.payload["k"], k], 2)
    values = torch.cat([memory.payload["v"], v], 2)
    k_pos, k_valid, same = join_cached(memory.metadata["pos"], memory.metadata["valid"], pos)
    return mixer.attend(u, q, keys, values, pos, k_pos, k_valid, same)


@pytest.mark.parametrize("method", ["native", "gqa", "mqa"])
@pytest.mark.parametrize("n_new,candidates", [(1, True), (4, True), (4, False)])
def test_step_equals_the_concatenating_reference(method, n_new, candidates):
    """One candidate (the shortcut), a slate (shared position) and appended tokens (causal
    among themselves), every layer, against the concatenating step."""
    model = tiny_model(method, layers=2)
    batch = random_batch(LENGTHS, seed=2)
    with torch.no_grad():
        memory = model.prefill(*history(batch))
        g = torch.Generator().manual_seed(3)
        x = torch.randn(len(LENGTHS), n_new, model.cfg.d_model, generator=g)
        start = memory.next_pos[:, None]
        pos = start.expand(-1, n_new) if candidates else start + torch.arange(n_new)
        for block, layer in zip(model.blocks, memory.layers):
            got, _ = block.mixer.step(x, pos, layer, append=False)
            torch.testing.assert_close(got, reference_step(block.mixer, x, pos, layer),
                                       rtol=1e-5, atol=1e-6)
            x, _ = block.step(x, pos, layer, append=False)


def state(memory):
    return [{name: t.clone() for name, t in {**m.payload, **m.metadata}.items()}
            for m in memory.layers]


def assert_same_memory(got, want, atol=1e-6):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for name in g:
            assert g[name].shape == w[name].shape and g[name].dtype == w[name].dtype, name
            torch.testing.assert_close(g[name], w[name], rtol=0, atol=atol)


def test_score_leaves_the_memory_unchanged():
    model = tiny_model("native")
    batch = random_batch(LENGTHS, seed=4)
    memory = model.prefill(*history(batch, 3))
    memory, _ = model.append(memory, batch["items"][:, -3:-2], batch["labels"][:, -3:-2])
    before, ptrs = state(memory), [m.payload["k"].data_ptr() for m in memory.layers]
    first = model.score(memory, batch["items"][:, -1:])
    model.score(memory, torch.randint(1, 60, (len(LENGTHS), 5)))
    assert_same_memory(state(memory), before, atol=0)
    assert [m.payload["k"].data_ptr() for m in memory.layers] == ptrs
    assert memory.layers[0].room.end == memory.layers[0].payload["k"].shape[2]
    torch.testing.assert_close(model.score(memory, batch["items"][:, -1:]), first,
                               rtol=0, atol=0)


def test_appends_into_spare_capacity_equal_a_fresh_prefill():
    """Prefill, then append 1, 2 and 1 interactions: the second and third go in place into
    the room the first made; the memory and the scores equal a prefill of the whole history."""
    model = tiny_model("native")
    batch = random_batch(LENGTHS, seed=5)
    items, labels = batch["items"], batch["labels"]
    memory = model.prefill(*history(batch, 5))
    rooms = []
    for new in (slice(-5, -4), slice(-4, -2), slice(-2, -1)):
        memory, _ = model.append(memory, items[:, new], labels[:, new])
        rooms.append([(m.room, m.payload["k"].data_ptr(), m.room.capacity) for m in memory.layers])
    assert all(isinstance(m, TokenMemory) for m in memory.layers)
    # one room per layer since the first append (capacity 2 x (cache + 1) covers 3 more)
    for first, later in zip(rooms[0], rooms[2]):
        assert later[0] is first[0] and later[1] == first[1] and later[2] == first[2]
    fresh = model.prefill(*history(batch, 1))
    assert_same_memory(state(memory), state(fresh))
    assert torch.equal(memory.next_pos, fresh.next_pos)
    cands = torch.randint(1, 60, (len(LENGTHS), 3), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(model.score(memory, cands), model.score(fresh, cands),
                               rtol=0, atol=1e-5)


def test_an_older_memory_appended_again_does_not_overwrite_the_newer():
    """Two appends from the same memory: the second must not write into the room the first
    one's memory reads (it copies), and the first memory stays what it was."""
    model = tiny_model("native")
    batch = random_batch(LENGTHS, seed=7)
    items, labels = batch["items"], batch["labels"]
    base = model.prefill(*history(batch, 3))
    base, _ = model.append(base, items[:, -3:-2], labels[:, -3:-2])  # base now has a room
    a, _ = model.append(base, items[:, -2:-1], labels[:, -2:-1])     # in place after base
    a_state, a_score = state(a), model.score(a, items[:, -1:])
    other = items[:, -2:-1] % 59 + 1                                   # a different interaction
    b, _ = model.append(base, other, 1 - labels[:, -2:-1])
    assert b.layers[0].room is not a.layers[0].room
    assert_same_memory(state(a), a_state, atol=0)
    torch.testing.assert_close(model.score(a, items[:, -1:]), a_score, rtol=0, atol=0)
    assert (model.score(b, items[:, -1:]) - a_score).abs().max() > 1e-6
    # and base itself is unchanged: appending to it again gives a again
    again, _ = model.append(base, items[:, -2:-1], labels[:, -2:-1])
    assert_same_memory(state(again), a_state, atol=0)


def test_bytes_count_the_used_part_not_the_capacity():
    model = tiny_model("native", layers=2)
    items = torch.randint(1, 60, (1, 12), generator=torch.Generator().manual_seed(8))
    labels = torch.randint(0, 2, (1, 12), generator=torch.Generator().manual_seed(9))
    memory = model.prefill(items[:, :6], labels[:, :6], torch.tensor([6]))
    for j in range(6, 12):
        memory, _ = model.append(memory, items[:, j:j + 1], labels[:, j:j + 1])
        n = 2 * (j + 1)  # cached tokens
        layer = memory.layers[0]
        assert layer.room.capacity > n  # spare room exists (not counted)
        for metadata in (False, True):
            want = 2 * model.method.memory_bytes(model.cfg, model.hp, n, metadata)
            assert memory.nbytes(metadata) == want
    fresh = model.prefill(items, labels, torch.tensor([12]))
    assert memory.nbytes(True) == fresh.nbytes(True)
    storage = sum(t.untyped_storage().nbytes() for t in memory.layers[0].room.full.values())
    assert storage > memory.layers[0].nbytes(True)  # the capacity really is larger


def test_empty_grown_keeps_the_dimension_order():
    k = torch.randn(2, 3, 5, 4).transpose(-1, -2).contiguous().transpose(-1, -2)  # K^T rows
    grown = empty_grown(k, 2, 9)
    assert grown.shape == (2, 3, 9, 4) and grown.stride() == (3 * 4 * 9, 4 * 9, 1, 9)
    assert empty_grown(torch.zeros(2, 5, dtype=torch.int32), 1, 8).shape == (2, 8)


def test_step_with_autograd_concatenates_and_backpropagates():
    model = tiny_model("native", layers=1)
    batch = random_batch(LENGTHS, seed=10)
    memory = model.prefill(*history(batch))
    mixer = model.blocks[0].mixer
    x = torch.randn(len(LENGTHS), 2, model.cfg.d_model, requires_grad=True)
    pos = memory.next_pos[:, None] + torch.arange(2)
    y, new = mixer.step(x, pos, memory.layers[0], append=True)
    y2, _ = mixer.step(x, pos + 2, new, append=True)
    (y.sum() + y2.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert getattr(new, "room", None) is None
    torch.testing.assert_close(y, reference_step(mixer, x, pos, memory.layers[0]),
                               rtol=1e-5, atol=1e-6)


def test_inference_mode_prefill_then_no_grad_appends():
    model = tiny_model("native", layers=1)
    batch = random_batch(LENGTHS, seed=11)
    with torch.inference_mode():
        memory = model.prefill(*history(batch, 3))
        memory, _ = model.append(memory, batch["items"][:, -3:-2], batch["labels"][:, -3:-2])
    memory, _ = model.append(memory, batch["items"][:, -2:-1], batch["labels"][:, -2:-1])
    fresh = model.prefill(*history(batch, 1))
    assert_same_memory(state(memory), state(fresh))
