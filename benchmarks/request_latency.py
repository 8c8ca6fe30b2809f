"""Per-request latency of every method after a prefill, beside its MACs (CPU, one user).

    python benchmarks/request_latency.py [--depth 4] [--length 1024] [--d-model 256] [--heads 8]
    python benchmarks/request_latency.py --smoke-test

For each registered method: prefill one user with L-1 interactions, then time `score` of one
candidate (median of --repeats after a warm-up). Printed beside the closed-form MACs, with
each method's speed-up over w/o Mem (recompute) and the MAC-predicted speed-up. Ratios come
from one run on one machine; absolute times depend on it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from malloc_ray.methods import method_names
from malloc_ray.metrics.cost import closed_form_macs
from malloc_ray.model.ctr import CTRModel
from malloc_ray.model.hstu import HSTUConfig


def time_request(model: CTRModel, length: int, repeats: int) -> tuple[float, float]:
    """(median seconds per request, prefill seconds) for one user with length-1 interactions."""
    g = torch.Generator().manual_seed(0)
    vocab = model.item_emb.num_embeddings
    items = torch.randint(1, vocab, (1, length - 1), generator=g)
    labels = torch.randint(0, 2, (1, length - 1), generator=g)
    target = torch.randint(1, vocab, (1, 1), generator=g)
    start = time.perf_counter()
    memory = model.prefill(items, labels, torch.tensor([length - 1]))
    prefill = time.perf_counter() - start
    model.score(memory, target)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.score(memory, target)
        times.append(time.perf_counter() - start)
    return statistics.median(times), prefill


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--length", type=int, default=1024, help="L: history L-1 plus the target")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--methods", help="comma-separated subset (default: all registered)")
    p.add_argument("--smoke-test", action="store_true", help="tiny shapes, seconds")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.depth, args.length, args.d_model, args.heads, args.repeats = 2, 64, 32, 4, 2
    torch.manual_seed(0)
    cfg = HSTUConfig(d_model=args.d_model, num_heads=args.heads, num_layers=args.depth,
                     max_len=args.length, dropout=0.0)
    names = args.methods.split(",") if args.methods else method_names()
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; depth {args.depth}, L={args.length}, "
          f"d={args.d_model}, {args.heads} heads")
    rows = []
    with torch.no_grad():
        for name in names:
            model = CTRModel(cfg, name, vocab_size=1000).eval()
            seconds, prefill = time_request(model, args.length, args.repeats)
            macs = closed_form_macs(model, args.length - 1)["request"]
            rows.append((name, seconds, prefill, macs))
    base = {r[0]: r for r in rows}.get("wo_mem")
    print(f"{'method':11s} {'request ms':>11s} {'prefill ms':>11s} {'MMACs':>10s} "
          f"{'speed-up':>9s} {'MAC ratio':>10s}")
    for name, seconds, prefill, macs in rows:
        speed = f"{base[1] / seconds:9.1f}" if base else "        -"
        ratio = f"{base[3] / macs:10.1f}" if base else "         -"
        print(f"{name:11s} {seconds * 1e3:11.2f} {prefill * 1e3:11.1f} {macs / 1e6:10.2f} "
              f"{speed} {ratio}")


if __name__ == "__main__":
    main()
