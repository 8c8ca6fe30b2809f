"""Evaluation throughput, `stream` vs `window` protocol, on CPU.

    python benchmarks/eval_stream.py [--length 512] [--users 60] [--depth 2]
    python benchmarks/eval_stream.py --smoke-test

A `window` evaluation prefills a fresh window per target (O(L^2) per target with full
attention); `stream` prefills each user's history once and then appends the split's targets
one by one (O(L) per target with a KV cache), as a server would. For an untrained Native model
(d = 32, 4 heads) on the validation split of a synthetic kuaivideo dataset with histories up
to L it prints targets/s of each protocol, their ratio, and the largest difference between
the two protocols' metrics (the same targets, the same earlier interactions, where every
history fits in L). Ratios come from one run on one machine.
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
from malloc_ray.train.loop import evaluate
from malloc_ray.train.trial import build_model


def timed(model, batches) -> tuple[dict, float]:
    start = time.perf_counter()
    metrics = evaluate(model, batches)
    return metrics, metrics["n"] / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=512, help="max_len (history cap) L")
    p.add_argument("--users", type=int, default=60)
    p.add_argument("--depth", type=int, default=2)
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
        cfg = TrialConfig(dataset=str(data), d_model=32, num_heads=4, depth=args.depth,
                          max_len=args.length, dropout=0.0)
        torch.manual_seed(0)
        model = build_model(cfg, ds).eval()
        batch = cfg.eval_batch_size
        for make in (local_batches(ds, "valid", batch, args.length),  # warm-up: one batch each
                     stream_batches(ds, "valid", args.length, batch)):
            evaluate(model, [next(iter(make))])
        window, w_rate = timed(model, local_batches(ds, "valid", batch, args.length))
        stream, s_rate = timed(model, stream_batches(ds, "valid", args.length, batch))
    print(f"machine: {platform.machine()} {platform.processor() or ''}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"L={args.length}, depth {args.depth}, {window['n']} valid targets of {args.users} "
          f"users, eval batch {batch}")
    print(f"window: {w_rate:10.1f} targets/s")
    print(f"stream: {s_rate:10.1f} targets/s   = {s_rate / w_rate:.1f}x window")
    gap = max(abs(window[k] - stream[k]) for k in ("auc", "gauc", "logloss"))
    print(f"largest metric difference stream vs window: {gap:.2e}")


if __name__ == "__main__":
    main()
