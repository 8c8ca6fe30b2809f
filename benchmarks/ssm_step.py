"""The selective SSM's serving step does not grow with the history (CPU, one user).

    python benchmarks/ssm_step.py [--depth 4] [--lengths 128,1024] [--d-model 256]
    python benchmarks/ssm_step.py --smoke-test

For each L: prefill one user with L-1 interactions, then time `score` of one candidate
(median of --repeats after a warm-up), beside the kept bytes and the closed-form request
MACs, with Native for contrast (its request reads the whole cache). Then the SSM's request
time at the longest L over the shortest, which should be ~1 (within 1.2x): a request reads a
state of fixed size. Rounds alternate between the lengths so that a change in the machine's
load hits both alike. One run on one machine: absolute times depend on it and on its load.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from malloc_ray.methods import get_method
from malloc_ray.metrics.cost import closed_form_macs, measure_user_bytes
from malloc_ray.model.ctr import CTRModel
from malloc_ray.model.hstu import HSTUConfig

VOCAB = 1000


def prefilled(cfg: HSTUConfig, method: str, length: int):
    """A model and one user's memory after length-1 interactions, and a candidate."""
    torch.manual_seed(0)
    model = CTRModel(cfg, get_method(method), vocab_size=VOCAB).eval()
    g = torch.Generator().manual_seed(0)
    items = torch.randint(1, VOCAB, (1, length - 1), generator=g)
    labels = torch.randint(0, 2, (1, length - 1), generator=g)
    memory = model.prefill(items, labels, torch.tensor([length - 1]))
    return model, memory, torch.randint(1, VOCAB, (1, 1), generator=g)


def time_requests(setups: dict, repeats: int, rounds: int) -> dict:
    """Median seconds per `score`, per setup; setups take turns, `rounds` times."""
    times = {key: [] for key in setups}
    for model, memory, target in setups.values():
        model.score(memory, target)  # warm-up
    for _ in range(rounds):
        for key, (model, memory, target) in setups.items():
            for _ in range(repeats):
                start = time.perf_counter()
                model.score(memory, target)
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--lengths", default="128,1024", help="comma-separated L (history L-1)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20, help="requests per round and setup")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 (default) is steadiest on a shared machine")
    p.add_argument("--smoke-test", action="store_true", help="tiny shapes, seconds")
    args = p.parse_args(argv)
    lengths = sorted(int(x) for x in args.lengths.split(","))
    if args.smoke_test:
        args.depth, args.d_model, args.heads, args.repeats, args.rounds = 2, 32, 4, 2, 2
        lengths = [16, 64]
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {load:.2f}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}; depth {args.depth}, d={args.d_model}, "
          f"{args.heads} heads")
    setups, rows = {}, []
    with torch.no_grad():
        for length in lengths:
            cfg = HSTUConfig(d_model=args.d_model, num_heads=args.heads, num_layers=args.depth,
                             max_len=length, dropout=0.0)
            for method in ("ssm", "native"):
                setups[method, length] = prefilled(cfg, method, length)
                model = setups[method, length][0]
                rows.append((method, length, measure_user_bytes(model, length - 1)["with_metadata"],
                             closed_form_macs(model, length - 1)["request"]))
        seconds = time_requests(setups, args.repeats, args.rounds)
    print(f"{'method':7s} {'L':>6s} {'request ms':>11s} {'KiB/user':>10s} {'MMACs':>8s}")
    for method, length, nbytes, macs in rows:
        print(f"{method:7s} {length:6d} {seconds[method, length] * 1e3:11.3f} "
              f"{nbytes / 1024:10.1f} {macs / 1e6:8.2f}")
    short, long = lengths[0], lengths[-1]
    for method in ("ssm", "native"):
        ratio = seconds[method, long] / seconds[method, short]
        verdict = (f" ({'within' if 1 / 1.2 <= ratio <= 1.2 else 'NOT within'} 1.2x)"
                   if method == "ssm" else "")
        print(f"{method}: request time L={long} / L={short} = {ratio:.2f}{verdict}")
    print(f"load after: {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "")


if __name__ == "__main__":
    main()
