"""Per-request latency of every method after a prefill, beside its MACs (CPU, one user).

    python benchmarks/request_latency.py [--depth 4] [--length 1024] [--d-model 256] [--heads 8]
    python benchmarks/request_latency.py --lengths 128,1024     # one table per length
    python benchmarks/request_latency.py --smoke-test

For each registered method: prefill one user with L-1 interactions, then time `score` of one
candidate (median of --repeats after a warm-up). Printed beside the closed-form MACs, with
each method's speed-up over w/o Mem (recompute), the MAC-predicted speed-up, and the share of
the predicted speed-up that was measured (`of MAC` = speed-up / MAC ratio). Ratios come from
one run on one machine; absolute times depend on it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from malloc_ray.methods import get_method, method_names
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


def measure(cfg: HSTUConfig, names: list[str], length: int, repeats: int) -> list[tuple]:
    """(method, request seconds, prefill seconds, request MACs) per method at one length."""
    rows = []
    with torch.no_grad():
        for name in names:
            model = CTRModel(cfg, get_method(name), vocab_size=1000).eval()
            seconds, prefill = time_request(model, length, repeats)
            macs = closed_form_macs(model, length - 1)["request"]
            rows.append((name, seconds, prefill, macs))
    return rows


def print_table(rows: list[tuple], length: int) -> None:
    base = {r[0]: r for r in rows}.get("wo_mem")
    print(f"{'method':11s} {'request ms':>11s} {'prefill ms':>11s} {'MMACs':>10s} "
          f"{'speed-up':>9s} {'MAC ratio':>10s} {'of MAC':>7s}")
    for name, seconds, prefill, macs in rows:
        speed = f"{base[1] / seconds:9.1f}" if base else "        -"
        ratio = f"{base[3] / macs:10.1f}" if base else "         -"
        share = f"{(base[1] / seconds) / (base[3] / macs):7.2f}" if base else "      -"
        print(f"{name:11s} {seconds * 1e3:11.2f} {prefill * 1e3:11.1f} {macs / 1e6:10.2f} "
              f"{speed} {ratio} {share}")
    native = {r[0]: r for r in rows}.get("native")
    if base and native:
        speed, ratio = base[1] / native[1], base[3] / native[3]
        verdict = "reaches" if speed >= ratio / 2 else "does not reach"
        print(f"L={length}: cached native request {speed:.1f}x faster than recompute; MACs "
              f"predict {ratio:.1f}x; measured/predicted {speed / ratio:.2f} ({verdict} half)")


def native_profile(cfg: HSTUConfig, length: int, repeats: int) -> dict[str, float]:
    """Share of a cached Native request's CPU time per kind of op (torch.profiler, self time):
    copying (aten::cat; Native's step used to concatenate cache and new token on every
    request, it now sums the two parts of the attention, so this should be near 0), matmuls,
    and the rest (elementwise ops over scores, masks, Python-side small ops)."""
    from torch.profiler import ProfilerActivity, profile

    model = CTRModel(cfg, get_method("native"), vocab_size=1000).eval()
    g = torch.Generator().manual_seed(0)
    items = torch.randint(1, 1000, (1, length - 1), generator=g)
    labels = torch.randint(0, 2, (1, length - 1), generator=g)
    target = torch.randint(1, 1000, (1, 1), generator=g)
    with torch.no_grad():
        memory = model.prefill(items, labels, torch.tensor([length - 1]))
        model.score(memory, target)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                model.score(memory, target)
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_us.values())
    matmul = sum(self_us.get(k, 0) for k in ("aten::bmm", "aten::mm", "aten::addmm"))
    return {"cat": self_us.get("aten::cat", 0) / total, "matmul": matmul / total}


def native_breakdown(cfg: HSTUConfig, rows: list[tuple], length: int, repeats: int) -> None:
    """Where a cached Native request's time goes: a fixed floor (the same request over one
    cached interaction), the part that grows with the cache, and the profiler's op shares."""
    by_name = {r[0]: r for r in rows}
    if "native" not in by_name or "wo_mem" not in by_name:
        return
    with torch.no_grad():
        native = CTRModel(cfg, get_method("native"), vocab_size=1000).eval()
        floor, _ = time_request(native, 2, repeats)
    request, base = by_name["native"][1], by_name["wo_mem"]
    ratio, grows = base[3] / by_name["native"][3], request - floor
    net = (f"net of the floor the speed-up is {base[1] / grows:.1f}x = "
           f"{base[1] / grows / ratio:.2f} of the MAC ratio" if grows > 0
           else "the whole request is within the floor (timing noise)")
    shares = native_profile(cfg, length, repeats)
    print(f"L={length}: native request {request * 1e3:.2f} ms = floor {floor * 1e3:.2f} ms "
          f"(same request over 1 cached interaction) + {grows * 1e3:.2f} ms that grows with "
          f"the cache; {net}. Profiled CPU time: cache copy (aten::cat) "
          f"{shares['cat']:.0%}, matmuls {shares['matmul']:.0%}, other ops "
          f"{1 - shares['cat'] - shares['matmul']:.0%}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--length", type=int, default=1024, help="L: history L-1 plus the target")
    p.add_argument("--lengths", help="comma-separated L values, one table each (overrides "
                                     "--length)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--methods", help="comma-separated subset (default: all registered)")
    p.add_argument("--threads", type=int,
                   help="torch threads (default: torch's); 1 is steadier on a busy machine, "
                        "where spinning worker threads wait on each other")
    p.add_argument("--smoke-test", action="store_true", help="tiny shapes, seconds")
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else [args.length]
    if args.smoke_test:
        args.depth, args.d_model, args.heads, args.repeats = 2, 32, 4, 2
        lengths = [16, 64] if args.lengths else [64]
    names = args.methods.split(",") if args.methods else method_names()
    if args.threads:
        torch.set_num_threads(args.threads)
    for length in lengths:
        torch.manual_seed(0)
        cfg = HSTUConfig(d_model=args.d_model, num_heads=args.heads, num_layers=args.depth,
                         max_len=length, dropout=0.0)
        print(f"machine: {platform.processor() or platform.machine()}, torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads; depth {args.depth}, "
              f"L={length}, d={args.d_model}, {args.heads} heads")
        rows = measure(cfg, names, length, args.repeats)
        print_table(rows, length)
        native_breakdown(cfg, rows, length, args.repeats)


if __name__ == "__main__":
    main()
