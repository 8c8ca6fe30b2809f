"""Native KV cache vs recompute: the equivalences of docs/methods/ (fp32, dropout off).

Cached requests equal w/o Mem's recomputed ones and the full forward: the registry-driven
contract tests check that for every lossless method (tests/test_method_contract.py).
"""

import torch

from model_fixtures import assert_appends_match_forward, history, random_batch, tiny_model

LENGTHS = [23, 9, 5, 17, 23, 12]  # random-ish lengths -> left padding inside one batch


def test_prefill_plus_appended_interactions_equals_full_forward():
    model = tiny_model("native")
    batch = random_batch(LENGTHS, seed=2)
    assert_appends_match_forward(model, batch, (1, 3))


def test_candidate_order_does_not_change_any_score():
    model = tiny_model("native")
    batch = random_batch(LENGTHS, seed=3)
    memory = model.prefill(*history(batch))
    candidates = torch.randint(1, 60, (len(LENGTHS), 7), generator=torch.Generator().manual_seed(4))
    scores = model.score(memory, candidates)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(model.score(memory, candidates[:, perm]), scores[:, perm],
                               rtol=0, atol=1e-5)
    # and a candidate scored alone gets the same score as inside the slate
    alone = model.score(memory, candidates[:, 2:3])[:, 0]
    torch.testing.assert_close(alone, scores[:, 2], rtol=0, atol=1e-5)


def test_score_depends_on_history_labels():
    """Guards the tests above against a model that ignores its memory."""
    model = tiny_model("native")
    batch = random_batch(LENGTHS, seed=6)
    items, labels, lengths = history(batch)
    target = batch["items"][:, -1:]
    base = model.score(model.prefill(items, labels, lengths), target)
    flipped = model.score(model.prefill(items, 1 - labels, lengths), target)
    assert (base - flipped).abs().max() > 1e-4


def test_native_bytes_are_layers_x_2_tokens_x_kv_x_d_x_4():
    from malloc_ray.metrics.cost import measure_user_bytes
    from malloc_ray.metrics.paper_compat import native_bytes

    model = tiny_model("native", layers=4)
    for n_history in (1, 10, 30):  # L - 1 history interactions -> 2(L-1) cached tokens
        measured = measure_user_bytes(model, n_history)["payload"]
        assert measured == 4 * (2 * n_history) * 2 * 32 * 4
        assert measured == native_bytes(4, 2 * n_history, 32)
    assert measure_user_bytes(tiny_model("wo_mem"), 10)["payload"] == 0


def test_predict_uses_serving_path_and_matches_training_forward():
    model = tiny_model("native")
    batch = random_batch(LENGTHS, seed=7)
    torch.testing.assert_close(model.predict(batch), torch.sigmoid(model.logits(batch)[:, -1]).detach(),
                               rtol=0, atol=1e-6)
