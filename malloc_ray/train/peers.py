"""Library CTR models on our data: torch-rechub's DIN and BST (the optional extra [peers]).

`export_ctr_inputs` (our code) turns a prepared dataset's split into the feature dict the
library's ranking models read. Each sample (user, prefix_len) is the trial's window: the
max_len - 1 interactions before the target, left-padded with 0, as two sequence features

* `hist_item`: the items of the window;
* `hist_pos_item`: the same items where the interaction's label is 1, else 0 (padding),

so that the peers see the history labels the HSTU model sees; plus the target item (the
candidate of datasets that name one) and the label. Both history features and the target
share one item embedding table.

The library is imported only when a peer runs; without it the CLI exits 2 naming the extra.
Training is the library's `CTRTrainer` with its documented defaults (Adam, lr 1e-3,
weight_decay 1e-5; n_epoch 10) on our train split, validated on our valid split, with early
stopping on validation AUC at patience 2 (the trainer's default patience, 10, equals its
epochs, so it would never stop early); the best validation epoch's weights are kept.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
import tempfile
import time

import numpy as np
import torch

from malloc_ray.data.loader import Dataset, collate_rows, select_samples
from malloc_ray.errors import InputError
from malloc_ray.metrics.ranking import ranking_metrics

EXTRA_HINT = "pip install -e '.[peers]'"
# CTRTrainer's documented defaults (torch_rechub.trainers.CTRTrainer docstring)
TRAINER_EPOCHS = 10
EARLY_STOP_PATIENCE = 2  # epochs without a better valid AUC (ours; the trainer's default is 10)
MLP_DIMS = [256, 128]  # the library's DIN example (examples/ranking/run_amazon_electronics.py)
SMOKE_STEPS = 4  # --smoke-test: training steps (and validation batches) of its one epoch


def import_rechub(kind: str = "din"):
    """The modules of torch-rechub a peer needs, or an InputError naming the extra."""
    try:
        importlib.import_module("torch_rechub")
        return {
            "features": importlib.import_module("torch_rechub.basic.features"),
            "ranking": importlib.import_module("torch_rechub.models.ranking"),
            "trainers": importlib.import_module("torch_rechub.trainers"),
            "data": importlib.import_module("torch_rechub.utils.data"),
        }
    except ImportError as exc:
        missing = exc.name or "torch_rechub"
        raise InputError(f"baseline {kind!r} needs torch-rechub, the optional extra [peers] "
                         f"({missing} cannot be imported): {EXTRA_HINT}") from None


def export_ctr_inputs(ds: Dataset, split: str, max_len: int, chunk: int = 8192
                      ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(x, y, user) of every sample of `split`, in `select_samples` order.

    x: hist_item, hist_pos_item (int32, n x (max_len - 1), left-padded with 0), target_item
    (n,); y: float32 labels; user: the sample's user (for GAUC)."""
    rows = select_samples(ds, split, max_len=max_len)
    width = max_len - 1
    n = len(rows)
    hist = np.zeros((n, width), dtype=np.int32)  # ids < 2**31; the models read them as long
    hist_pos = np.zeros((n, width), dtype=np.int32)
    target = np.zeros(n, dtype=np.int32)
    label = np.zeros(n, dtype=np.float32)
    for lo in range(0, n, chunk):
        part = rows.iloc[lo:lo + chunk]
        batch = collate_rows(ds.arrays, part, max_len)  # the trial's own windows
        items, labels = batch["items"].numpy(), batch["labels"].numpy()
        h, hl = items[:, :-1], labels[:, :-1]
        hi = slice(lo, lo + len(part))
        if h.shape[1]:
            hist[hi, width - h.shape[1]:] = h
            hist_pos[hi, width - h.shape[1]:] = np.where(hl == 1, h, 0)
        target[hi], label[hi] = items[:, -1], labels[:, -1]
    x = {"hist_item": hist, "hist_pos_item": hist_pos, "target_item": target}
    return x, label, rows["user"].to_numpy()


def build_model(kind: str, rechub: dict, vocab: int, embed_dim: int, max_len: int):
    """DIN or BST over the exported features, with the models' own defaults elsewhere."""
    F = rechub["features"]
    target = F.SparseFeature("target_item", vocab_size=vocab, embed_dim=embed_dim,
                             padding_idx=0)
    history = [F.SequenceFeature(name, vocab_size=vocab, embed_dim=embed_dim, pooling="concat",
                                 shared_with="target_item", padding_idx=0)
               for name in ("hist_item", "hist_pos_item")]
    # Each history feature attends with (DIN) / is fused with (BST) a target feature of the same
    # width: the one target item, named twice through the shared table.
    target_twice = [target, F.SparseFeature("target_item_2", vocab_size=vocab,
                                            embed_dim=embed_dim, shared_with="target_item",
                                            padding_idx=0)]
    if kind == "din":
        return rechub["ranking"].DIN(features=[target], history_features=history,
                                     target_features=target_twice,
                                     mlp_params={"dims": MLP_DIMS}, attention_mlp_params={})
    return rechub["ranking"].BST(features=[target], history_features=history,
                                 target_features=target_twice, mlp_params={"dims": MLP_DIMS},
                                 max_seq_len=max_len)


def _with_second_target(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**x, "target_item_2": x["target_item"]}


def _loader(rechub, x, y, batch_size: int, shuffle: bool, seed: int, limit: int | None = None):
    if limit is not None:
        x, y = {k: v[:limit] for k, v in x.items()}, y[:limit]
    data = rechub["data"].TorchDataset(_with_second_target(x), y)
    # drop_last in training: the library's MLP has BatchNorm, which refuses a batch of one
    return torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle and len(y) > batch_size,
        generator=torch.Generator().manual_seed(seed) if shuffle else None)


def peer_baseline(kind: str, ds: Dataset, split: str = "test", *, max_len: int | None = None,
                  epochs: int | None = None, seed: int = 0, smoke_test: bool = False,
                  batch_size: int | None = None, embed_dim: int | None = None,
                  patience: int | None = None, device: str | None = None) -> dict:
    """Train torch-rechub's `kind` ("din" or "bst") on the train split with early stopping on
    valid, and score `split`. Defaults: the trial's max_len, batch_size and d_model (as the
    embedding width); the trainer's epochs and patience."""
    from malloc_ray.train.baselines import trial_default

    if kind not in ("din", "bst"):
        raise ValueError(f"unknown peer {kind!r}")
    rechub = import_rechub(kind)
    max_len = max_len or trial_default("max_len")
    if max_len < 2:
        raise InputError(f"max_len must be >= 2 (history + target), got {max_len}",
                         key="max_len")
    batch_size = batch_size or trial_default("batch_size")
    embed_dim = embed_dim or trial_default("d_model")
    epochs = 1 if smoke_test else (epochs or TRAINER_EPOCHS)
    patience = patience or EARLY_STOP_PATIENCE
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "bst" and (2 * embed_dim) % 8:
        raise InputError(f"bst fuses two history features into 2 x embed_dim, which its 8 "
                         f"attention heads must divide; got embed_dim {embed_dim}",
                         key="embed_dim")
    np.random.seed(seed)
    torch.manual_seed(seed)
    train_x, train_y, _ = export_ctr_inputs(ds, "train", max_len)
    valid_x, valid_y, _ = export_ctr_inputs(ds, "valid", max_len)
    eval_x, eval_y, eval_user = export_ctr_inputs(ds, split, max_len)
    if not len(train_y) or not len(valid_y):
        raise InputError(f"dataset {ds.meta.get('name')!r} has no train or no valid samples",
                         file=str(ds.path))
    limit = SMOKE_STEPS * batch_size if smoke_test else None
    train_dl = _loader(rechub, train_x, train_y, batch_size, True, seed, limit)
    valid_dl = _loader(rechub, valid_x, valid_y, 4 * batch_size, False, seed, limit)
    eval_dl = _loader(rechub, eval_x, eval_y, 4 * batch_size, False, seed)

    model = build_model(kind, rechub, int(ds.meta["vocab_size"]), embed_dim, max_len)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch, _library_prints_to_stderr():
        trainer = rechub["trainers"].CTRTrainer(model, n_epoch=epochs,
                                                earlystop_patience=patience, device=device,
                                                model_path=scratch)
        trainer.fit(train_dl, valid_dl)
        stopper = trainer.early_stopper
        if stopper.best_weights is not None:  # fit restores them only when it stops early
            trainer.model.load_state_dict(stopper.best_weights)
        seconds = time.perf_counter() - t0
        probs = np.asarray(trainer.predict(trainer.model, eval_dl), dtype=np.float64)
    return {**ranking_metrics(eval_y, probs, eval_user), "n": int(len(eval_y)),
            "train_seconds": seconds, "best_valid_auc": float(stopper.best_auc),
            "library": f"torch-rechub {_version()}", "max_len": max_len, "epochs": epochs,
            "patience": patience, "batch_size": batch_size, "embed_dim": embed_dim,
            "seed": seed, "device": device, "smoke_test": smoke_test}


@contextlib.contextmanager
def _library_prints_to_stderr():
    """The trainer prints progress to stdout, which carries the CLI's JSON: send it to stderr."""
    with contextlib.redirect_stdout(sys.stderr if sys.stderr else io.StringIO()):
        yield


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-rechub")
    except PackageNotFoundError:
        return "unknown"
