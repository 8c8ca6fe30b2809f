"""Evaluation throughput on CPU: the evaluation batch size, and in-place vs reference attention.

    python benchmarks/eval_batch.py [--lengths 32,128,512] [--users 300] [--batch-sizes 4,16,64,256]
    python benchmarks/eval_batch.py --smoke-test

Evaluation scores each validation window through the serving path (prefill the history, score
the target). For each L it prints samples/s of an untrained Native model (d = 32, 4 heads,
depth 2) over the validation split of a synthetic kuaivideo dataset, per evaluation batch size,
with the batch size a trial gets by default (`config.default_eval_batch_size`) marked, and the
same evaluation with the attention forced onto `pointwise_attention_reference` (the version
that allocates a new score tensor per op), at the default and the largest batch size. Ratios
come from one run on one machine.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import malloc_ray.methods.native as native_module
from malloc_ray.config import TrialConfig
from malloc_ray.data.loader import load_dataset, local_batches
from malloc_ray.data.prepare import prepare
from malloc_ray.model.hstu import pointwise_attention_reference
from malloc_ray.train.loop import evaluate
from malloc_ray.train.trial import build_model


@contextmanager
def reference_attention():
    """Native's layers (and so this benchmark's model) call the reference attention."""
    fast = native_module.pointwise_attention
    native_module.pointwise_attention = pointwise_attention_reference
    try:
        yield
    finally:
        native_module.pointwise_attention = fast


def samples_per_second(model, ds, batch_size: int, max_len: int) -> float:
    start = time.perf_counter()
    n = evaluate(model, local_batches(ds, "valid", batch_size, max_len))["n"]
    return n / (time.perf_counter() - start)


def bench_length(work: Path, length: int, users: int, batch_sizes: list[int]) -> None:
    data = work / f"kuai_{length}"
    prepare("synthetic", data, profile="kuaivideo", users=users, max_len=length, seed=0)
    ds = load_dataset(data)
    cfg = TrialConfig(dataset=str(data), d_model=32, num_heads=4, depth=2, max_len=length)
    torch.manual_seed(0)
    model = build_model(cfg, ds).eval()
    auto = cfg.eval_batch_size
    sizes = sorted(set(batch_sizes) | {auto})
    samples_per_second(model, ds, auto, length)  # warm-up: first calls allocate and dispatch
    rates = {b: samples_per_second(model, ds, b, length) for b in sizes}
    largest = max(sizes)
    with reference_attention():
        reference = {b: samples_per_second(model, ds, b, length) for b in sorted({auto, largest})}
    best = max(rates, key=rates.get)
    print(f"L={length} ({ds.meta['dataset_id']}, {users} users):")
    for b in sizes:
        mark = "  <- default" if b == auto else ""
        print(f"  eval batch {b:4d}: {rates[b]:9.1f} samples/s  {rates[b] / rates[auto]:5.2f}x "
              f"the default{mark}")
    versus = ", ".join(f"{rates[b] / reference[b]:.2f}x at batch {b}" for b in reference)
    print(f"  L={length}: default batch {auto} reaches {rates[auto] / rates[best]:.2f} of the "
          f"best ({best}); in-place attention vs the reference: {versus}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="32,128,512")
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--batch-sizes", default="4,16,64,256")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--smoke-test", action="store_true", help="tiny sizes, seconds")
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    if args.smoke_test:
        lengths, args.users, sizes = [16], 40, [4, 64]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        for length in lengths:
            bench_length(Path(tmp), length, args.users, sizes)


if __name__ == "__main__":
    main()
