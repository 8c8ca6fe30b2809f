"""Evaluation throughput, `stream` vs `window` protocol, on CPU.

    python benchmarks/eval_stream.py [--length 512] [--users 60] [--depth 2] [--method native]
    python benchmarks/eval_stream.py --smoke-test

A `window` evaluation prefills a fresh window per target (O(L^2) per target with full
attention); `stream` prefills each user's history once and then appends the split's targets
one by one (O(L) per target with a KV cache), as a server would; a method that declares
`batched_append` appends a user's targets in one step. For an untrained model (d = 32,
4 heads; Native by default) on the validation split of a synthetic kuaivideo dataset with
histories up to L it prints targets/s of each protocol, their ratio, and the largest
difference between the two protocols' metrics (the same targets, the same earlier
interactions, where every history fits in L); for a `batched_append` method also the stream
with one step per target. Ratios come from one run on one machine.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from malloc_ray.config import TrialConfig
from malloc_ray.data.loader import load_dataset, local_batches
from malloc_ray.data.prepare import prepare
from malloc_ray.data.streams import stream_batches
from malloc_ray.metrics.ranking import ranking_metrics
from malloc_ray.train.loop import evaluate
from malloc_ray.train.trial import build_model


def timed(model, batches) -> tuple[dict, float]:
    start = time.perf_counter()
    metrics = evaluate(model, batches)
    return metrics, metrics["n"] / (time.perf_counter() - start)


def timed_one_step_per_target(model, batches) -> tuple[dict, float]:
    """The stream with one append per target, the way a method without batched_append runs."""
    start, probs, labels, users = time.perf_counter(), [], [], []
    with torch.no_grad():
        for b in batches:
            probs.append(model.predict_stream(b, batched=False).double())
            labels.append(b["eval_labels"])
            users.append(b["eval_users"])
    p, y, u = (torch.cat(x) for x in (probs, labels, users))
    return ranking_metrics(y, p, u), y.numel() / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=512, help="max_len (history cap) L")
    p.add_argument("--users", type=int, default=60)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--method", default="native", help="memory method (malloc-ray methods)")
    p.add_argument("--smoke-test", action="store_true", help="tiny sizes, seconds")
    args = p.parse_args()
    if args.smoke_test:
        args.length, args.users = 48, 12
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "kuai"
        prepare("synthetic", data, profile="kuaivideo", users=args.users,
                max_len=args.length, seed=0)
        ds = load_dataset(data)
        cfg = TrialConfig(dataset=str(data), method=args.method, d_model=32, num_heads=4,
                          depth=args.depth,
                          max_len=args.length, dropout=0.0)
        torch.manual_seed(0)
        model = build_model(cfg, ds).eval()
        batch = cfg.eval_batch_size
        for make in (local_batches(ds, "valid", batch, args.length),  # warm-up: one batch each
                     stream_batches(ds, "valid", args.length, batch)):
            evaluate(model, [next(iter(make))])
        window, w_rate = timed(model, local_batches(ds, "valid", batch, args.length))
        stream, s_rate = timed(model, stream_batches(ds, "valid", args.length, batch))
        batched = model.method.appends_in_batches()
        if batched:
            single, o_rate = timed_one_step_per_target(
                model, stream_batches(ds, "valid", args.length, batch))
    print(f"machine: {platform.machine()} {platform.processor() or ''}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"L={args.length}, depth {args.depth}, {window['n']} valid targets of {args.users} "
          f"users, eval batch {batch}")
    print(f"window: {w_rate:10.1f} targets/s")
    print(f"stream: {s_rate:10.1f} targets/s   = {s_rate / w_rate:.1f}x window"
          + ("   (all of a user's targets in one append)" if batched else ""))
    if batched:
        print(f"stream, one append per target: {o_rate:10.1f} targets/s   "
              f"(batched = {s_rate / o_rate:.1f}x)")
    others = [window] + ([single] if batched else [])
    gap = max(abs(o[k] - stream[k]) for o in others for k in ("auc", "gauc", "logloss"))
    print(f"largest metric difference stream vs window"
          + (" or one append per target" if batched else "") + f": {gap:.2e}")


if __name__ == "__main__":
    main()
