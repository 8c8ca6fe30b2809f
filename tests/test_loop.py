"""Training loop: learning, early stopping with restore, failure guard, no-learning detection.

Dummy models follow the model contract (`loss(batch)`, `predict(batch)` at the target position).
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from malloc_ray.train.loop import DIVERGED_METRICS, TrainConfig, evaluate, fit

N_ITEMS, SEQ = 40, 4


def make_split(n_batches, seed, batch_size=64, n_users=30):
    """Left-padded batches whose target label depends only on the target item (learnable)."""
    rng = np.random.default_rng(seed)
    item_logit = np.random.default_rng(123).normal(0.0, 3.0, N_ITEMS + 1)
    batches = []
    for _ in range(n_batches):
        lengths = rng.integers(1, SEQ + 1, batch_size)
        items = rng.integers(1, N_ITEMS + 1, (batch_size, SEQ))
        labels = rng.integers(0, 2, (batch_size, SEQ))
        pad = np.arange(SEQ)[None, :] < (SEQ - lengths)[:, None]
        items[pad], labels[pad] = 0, 0
        p = 1.0 / (1.0 + np.exp(-item_logit[items[:, -1]]))
        labels[:, -1] = rng.random(batch_size) < p
        batches.append({"items": torch.tensor(items), "labels": torch.tensor(labels),
                        "lengths": torch.tensor(lengths),
                        "user": torch.tensor(rng.integers(0, n_users, batch_size))})
    return batches


TRAIN, VALID, TEST = make_split(20, 1), make_split(8, 2), make_split(8, 3)


def shuffled(batches, poison_epoch=None, scale=None):
    """train_batches(epoch): a seeded reshuffle; at `poison_epoch` every batch carries a loss scale."""
    def train_batches(epoch):
        order = np.random.default_rng(epoch).permutation(len(batches))
        for i in order:
            batch = dict(batches[i])
            if epoch == poison_epoch:
                batch["scale"] = torch.tensor(scale)
            yield batch
    return train_batches


class TargetLogReg(nn.Module):
    """Logistic regression on the target item's id; `batch["scale"]` multiplies the loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(N_ITEMS + 1, 1)

    def logits(self, batch):
        return self.emb(batch["items"][:, -1]).squeeze(-1)

    def loss(self, batch):
        loss = nn.functional.binary_cross_entropy_with_logits(
            self.logits(batch), batch["labels"][:, -1].float())
        return loss * batch.get("scale", 1.0)

    def predict(self, batch):
        return torch.sigmoid(self.logits(batch))


class BiasOnly(TargetLogReg):
    """Cannot learn a ranking: every user gets the same probability, so AUC is exactly 0.5."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    def logits(self, batch):
        return self.bias.expand(batch["items"].shape[0])


class Scripted(nn.Module):
    """Validation quality follows a fixed schedule over epochs, so early stopping is predictable.

    `steps` counts training steps and is part of the state dict: after restore it tells which
    epoch's weights are loaded. predict() peeks at the label (a test fixture, not a model).
    """

    def __init__(self, strengths, steps_per_epoch):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.strengths, self.steps_per_epoch = strengths, steps_per_epoch

    def loss(self, batch):
        self.steps += 1
        return (self.w - 1.0) ** 2

    def predict(self, batch):
        epoch = int(self.steps) // self.steps_per_epoch - 1
        y = batch["labels"][:, -1].float() * 2 - 1
        noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(int(batch["user"][0])))
        return torch.sigmoid(self.strengths[epoch] * y + noise)


def run(model, cfg, train=None, **kw):
    return fit(model, train or shuffled(TRAIN), lambda: VALID, lambda: TEST, cfg, **kw)


def test_learns_and_reports_everything():
    seen = []
    result = run(TargetLogReg(), TrainConfig(lr=0.05, epochs=8, patience=8), on_epoch=seen.append)
    assert result["status"] == "ok" and result["failed_epoch"] is None
    assert result["auc"] > 0.8 and result["gauc"] > 0.75 and result["logloss"] < 0.6
    assert result["epochs_run"] == 8 == len(seen) == len(result["history"])
    assert seen == result["history"]
    assert set(seen[0]) == {"epoch", "pass", "step", "lr", "train_loss", "valid_auc", "valid_gauc",
                           "valid_logloss", "seconds"}
    assert result["valid_auc"] == max(r["valid_auc"] for r in result["history"])
    assert result["samples_per_second"] == pytest.approx(8 * 20 * 64 / result["train_seconds"])


def test_deterministic_given_seed():
    cfg = TrainConfig(lr=0.05, epochs=3, patience=3)
    a, b = run(TargetLogReg(), cfg), run(TargetLogReg(), cfg)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"]) and a["auc"] == b["auc"]


def test_early_stopping_restores_best_epoch():
    steps = 5
    model = Scripted([0.5, 3.0, 1.0, 0.7, 0.5, 6.0, 6.0], steps)
    result = run(model, TrainConfig(epochs=7, patience=3, max_steps_per_epoch=steps,
                                    max_valid_drop=None, warmup_steps=0))
    assert result["status"] == "ok"
    assert result["best_epoch"] == 1 and result["epochs_run"] == 5  # epochs 2, 3, 4 did not improve
    assert int(model.steps) == 2 * steps  # the weights after epoch 1 are back
    assert result["valid_auc"] == result["history"][1]["valid_auc"]
    assert result["auc"] == evaluate(model, TEST)["auc"]


def test_a_fall_below_the_best_stops_before_the_patience_is_spent():
    steps = 5
    scripted = [0.5, 3.0, 1.0, 0.7, 0.5, 6.0, 6.0]
    curve = [r["valid_auc"] for r in run(Scripted(scripted, steps), TrainConfig(
        epochs=7, patience=7, max_steps_per_epoch=steps, max_valid_drop=None,
        warmup_steps=0))["history"]]
    drop = curve[1] - curve[2]  # the first evaluation after the best is already worse
    assert drop > 0
    model = Scripted(scripted, steps)
    result = run(model, TrainConfig(epochs=7, patience=7, max_steps_per_epoch=steps,
                                    max_valid_drop=drop / 2, warmup_steps=0))
    assert result["best_epoch"] == 1 and result["epochs_run"] == 3  # stopped at the fall
    assert int(model.steps) == 2 * steps  # and back at the best weights
    kept = run(Scripted(scripted, steps), TrainConfig(
        epochs=7, patience=2, max_steps_per_epoch=steps, max_valid_drop=drop * 2,
        warmup_steps=0))
    assert kept["epochs_run"] == 4  # a smaller fall: patience decides


def test_a_dip_before_the_model_learned_anything_is_left_to_the_patience():
    steps, flat = 5, [0.04, 0.0, 0.0, 0.0, 0.0, 0.0]
    cfg = dict(epochs=6, patience=3, max_steps_per_epoch=steps, no_learning_margin=0.1,
               warmup_steps=0)
    curve = [r["valid_auc"] for r in run(Scripted(flat, steps), TrainConfig(
        **cfg, max_valid_drop=None))["history"]]
    assert curve[0] - curve[1] > 0.001 and max(curve) < 0.6  # a dip, below "learned"
    result = run(Scripted(flat, steps), TrainConfig(**cfg, max_valid_drop=0.001))
    assert result["epochs_run"] == 4  # not stopped at the dip: the patience ran out


@pytest.mark.parametrize("scale, reason", [(math.nan, "loss"), (1e9, "gradient norm")])
def test_divergence_is_a_result(scale, reason):
    model = TargetLogReg()
    result = run(model, TrainConfig(lr=0.05, epochs=6, patience=6), train=shuffled(TRAIN, 2, scale))
    assert result["status"] == "diverged" and result["failed_epoch"] == 2
    assert reason in result["reason"]
    assert result["epochs_run"] == 2 and result["best_epoch"] in (0, 1)
    for key, value in DIVERGED_METRICS.items():
        assert result[key] == value and math.isfinite(value)
    assert result["valid_auc"] == 0.5
    # the bad update was never applied and the best weights are back in the model
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_predictions_are_divergence():
    class NanPredict(TargetLogReg):
        def predict(self, batch):
            return super().predict(batch) * math.nan

    result = run(NanPredict(), TrainConfig(epochs=3))
    assert result["status"] == "diverged" and result["failed_epoch"] == 0


def test_no_learning_detected():
    result = run(BiasOnly(), TrainConfig(lr=0.05, epochs=10, no_learning_epochs=2,
                                         warmup_steps=0))
    assert result["status"] == "no_learning" and result["failed_epoch"] == 1
    assert result["epochs_run"] == 2 and result["valid_auc"] == 0.5
    assert math.isfinite(result["logloss"])


def test_learning_model_passes_no_learning_check():
    result = run(TargetLogReg(), TrainConfig(lr=0.05, epochs=2, no_learning_epochs=1))
    assert result["status"] == "ok"


def test_rejects_zero_patience():
    with pytest.raises(ValueError):
        TrainConfig(patience=0)


def test_no_learning_is_on_by_default_and_its_margin_configurable():
    """Without no_learning_epochs the run trains to the end, then is judged: a model that
    cannot beat chance is `no_learning` (metrics kept), and a margin of 0 would accept it."""
    result = run(BiasOnly(), TrainConfig(lr=0.05, epochs=3, patience=5))
    assert result["status"] == "no_learning" and result["epochs_run"] == 3
    assert result["auc"] == result["auc"] and "0.5 + 0.02" in result["reason"]
    accepted = run(BiasOnly(), TrainConfig(lr=0.05, epochs=3, patience=5,
                                           no_learning_margin=0.0))  # AUC 0.5 >= 0.5 + 0
    assert accepted["status"] == "ok"
    assert run(TargetLogReg(), TrainConfig(lr=0.05, epochs=2))["status"] == "ok"


# -- the recipe ----------------------------------------------------------------------------------
def test_eval_every_steps_evaluates_within_a_pass_and_patience_counts_evaluations():
    """20 batches per pass, evaluation every 8 steps: evaluations after steps 8, 16 and the
    pass's end (20), per pass; early stopping counts those evaluations."""
    seen = []
    result = run(TargetLogReg(), TrainConfig(lr=0.05, epochs=2, patience=10, eval_every_steps=8),
                 on_epoch=seen.append)
    assert [(r["pass"], r["step"]) for r in seen] == [(0, 8), (0, 16), (0, 20), (1, 28),
                                                       (1, 36), (1, 40)]
    assert [r["epoch"] for r in seen] == list(range(6)) and result["epochs_run"] == 6
    # BiasOnly never improves on its first evaluation: patience 1 ends it at the second,
    # within the first pass
    stopped = run(BiasOnly(), TrainConfig(lr=0.05, epochs=5, patience=1, eval_every_steps=5,
                                          no_learning_margin=None, warmup_steps=0))
    assert [(r["pass"], r["step"]) for r in stopped["history"]] == [(0, 5), (0, 10)]


class CountsPositions(TargetLogReg):
    """Says how many targets a batch trains (a loss on every real position, as CTRModel's
    `loss_positions: all`)."""

    def loss_targets(self, batch):
        return batch["lengths"].sum()


def test_eval_every_targets_counts_the_targets_a_model_trains_on():
    per_batch = [int(b["lengths"].sum()) for b in TRAIN]
    every = sum(per_batch[:3])  # the first three batches of pass 0 in file order
    order = np.random.default_rng(0).permutation(len(TRAIN))  # pass 0's shuffle
    counted = np.cumsum([per_batch[i] for i in order])
    first = int(np.argmax(counted >= every)) + 1  # the step that reaches `every`
    seen = []
    run(CountsPositions(), TrainConfig(lr=0.05, epochs=1, patience=50, eval_every_targets=every,
                                       max_valid_drop=None), on_epoch=seen.append)
    assert seen[0]["step"] == first and seen[-1]["step"] == 20  # and the pass's end
    assert 20 // 4 <= len(seen) <= 20  # several evaluations within the pass, each >= 1 step
    plain = []  # a model that does not say: one target per sample (64 a batch here)
    run(TargetLogReg(), TrainConfig(lr=0.05, epochs=1, patience=50, eval_every_targets=64 * 5,
                                    max_valid_drop=None), on_epoch=plain.append)
    assert [r["step"] for r in plain] == [5, 10, 15, 20]


def test_embedding_l2_shrinks_only_the_rows_a_batch_touches():
    """Only never-seen items keep their initial embedding; with the penalty the others end up
    smaller than without it (the task's loss alone pushes them outwards)."""
    unseen = 7  # an item no batch contains
    train = [{**b, "items": torch.where(b["items"] == unseen, 1, b["items"])} for b in TRAIN]
    plain, shrunk = TargetLogReg(), TargetLogReg()
    before = plain.emb.weight.detach().clone()
    run(plain, TrainConfig(lr=0.05, epochs=3, patience=3), train=shuffled(train))
    run(shrunk, TrainConfig(lr=0.05, epochs=3, patience=3, embedding_l2=0.5),
        train=shuffled(train))
    assert torch.equal(shrunk.emb.weight[unseen], before[unseen])
    seen = torch.ones(N_ITEMS + 1, dtype=torch.bool)
    seen[[0, unseen]] = False
    assert shrunk.emb.weight[seen].norm() < 0.8 * plain.emb.weight[seen].norm()


def test_weight_decay_spares_embeddings_and_warmup_ramps_the_rate():
    from malloc_ray.train.loop import optimizer_for

    class Two(TargetLogReg):
        def __init__(self):
            super().__init__()
            self.proj, self.norm = nn.Linear(3, 3), nn.LayerNorm(3)

    opt = optimizer_for(Two(), TrainConfig(weight_decay=0.1))
    decayed = [p for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert [tuple(p.shape) for p in decayed] == [(3, 3)]  # not the embedding, bias or norm
    seen = []
    run(TargetLogReg(), TrainConfig(lr=0.04, epochs=1, warmup_steps=40, eval_every_steps=5),
        on_epoch=seen.append)
    assert [r["lr"] for r in seen] == pytest.approx([0.04 * (s + 1) / 40 for s in
                                                     (5, 10, 15, 20)])


def test_plateau_factor_cuts_the_rate_after_an_evaluation_without_improvement():
    seen = []
    result = run(BiasOnly(), TrainConfig(lr=0.05, epochs=4, patience=4, lr_plateau_factor=0.5,
                                         warmup_steps=0, no_learning_margin=None),
                 on_epoch=seen.append)
    assert result["epochs_run"] == 4
    # BiasOnly's valid AUC never improves on its first evaluation: the rate is halved after
    # each later one (a record holds the rate its steps trained with)
    assert [r["lr"] for r in seen] == pytest.approx([0.05, 0.05, 0.025, 0.0125])


def test_evaluations_inside_the_warm_up_never_stop_a_run_nor_spend_its_patience():
    """BiasOnly never improves on its first evaluation. Evaluated every 5 steps with a 22-step
    warm-up, its evaluations at steps 5, 10, 15 and 20 are inside the warm-up: patience 1 (or
    a no_learning check after one evaluation) stops it only at the first evaluation after
    the warm-up, step 25, and with patience 2 at the second, step 30. Without a warm-up the
    same run stops at step 10."""
    cfg = dict(lr=0.05, epochs=5, eval_every_steps=5, no_learning_margin=None)
    steps = [[r["step"] for r in run(BiasOnly(), TrainConfig(
        **cfg, patience=patience, warmup_steps=warmup))["history"]]
        for patience, warmup in ((1, 0), (1, 22), (2, 22))]
    assert steps == [[5, 10], [5, 10, 15, 20, 25], [5, 10, 15, 20, 25, 30]]
    judged = run(BiasOnly(), TrainConfig(lr=0.05, epochs=5, eval_every_steps=5, patience=9,
                                         warmup_steps=22, no_learning_epochs=1))
    assert judged["status"] == "no_learning" and judged["history"][-1]["step"] == 25
