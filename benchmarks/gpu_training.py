"""GPU training throughput: eager vs torch.compile vs bf16, and trials/hour packed on one GPU.

    python benchmarks/gpu_training.py [--depth 4] [--length 256] [--d-model 128] [--batch 128]
    python benchmarks/gpu_training.py --smoke-test      # tiny, on CPU: proves the code paths

1. Training samples/s of one Native CTR model on synthetic batches, for eager fp32, eager
   bf16 autocast, torch.compile fp32 and torch.compile bf16 (median step time after warm-up
   steps, which also absorb compilation).
2. Trials/hour with 1, 2 and 4 trials packed on one GPU through Ray Tune fractional resources
   ({"gpu": 1/k}); each trial trains the same model for --trial-steps steps and caps itself at
   1/k of the device memory, as study trials do. The same number of trials runs for each k.

Without CUDA it exits with a message and measures nothing, unless --smoke-test (CPU, tiny
shapes, compile with the "eager" backend so no compiler toolchain is needed).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch


def make_model(args, device: str):
    from malloc_ray.methods import get_method
    from malloc_ray.model.ctr import CTRModel
    from malloc_ray.model.hstu import HSTUConfig

    torch.manual_seed(0)
    cfg = HSTUConfig(d_model=args.d_model, num_heads=args.heads, num_layers=args.depth,
                     max_len=args.length, dropout=0.0)
    return CTRModel(cfg, get_method("native"), vocab_size=args.vocab).to(device)


def make_batch(args, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    items = torch.randint(1, args.vocab, (args.batch, args.length), generator=g)
    labels = torch.randint(0, 2, (args.batch, args.length), generator=g)
    lengths = torch.full((args.batch,), args.length)
    return {k: v.to(device) for k, v in
            {"items": items, "labels": labels, "lengths": lengths}.items()}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_seconds(args, device: str, compiled: bool, bf16: bool, steps: int,
                 warmup: int) -> float:
    """Median seconds of one training step (forward, backward, Adam)."""
    model = make_model(args, device)
    batch = make_batch(args, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = model.loss
    if compiled:  # compile the loss (the whole forward); "eager" backend: no codegen on CPU
        loss_fn = torch.compile(model.loss, backend=args.compile_backend)
    autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
    times = []
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(batch)
        loss.backward()
        opt.step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(args, device: str) -> None:
    print(f"{'variant':16s} {'step ms':>9s} {'samples/s':>11s} {'vs eager':>9s}")
    base = None
    for name, compiled, bf16 in (("eager fp32", False, False), ("eager bf16", False, True),
                                 ("compile fp32", True, False), ("compile bf16", True, True)):
        seconds = step_seconds(args, device, compiled, bf16, args.steps, args.warmup)
        base = base or seconds
        print(f"{name:16s} {seconds * 1e3:9.2f} {args.batch / seconds:11.0f} "
              f"{base / seconds:8.2f}x", flush=True)


def packed_trial(config: dict) -> None:
    """One Tune trial: train for config['steps'] steps within 1/k of the device."""
    from argparse import Namespace

    from ray import tune

    args, device = Namespace(**config["args"]), config["device"]
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(config["fraction"])
    seconds = step_seconds(args, device, compiled=False, bf16=False, steps=config["steps"],
                           warmup=1)
    tune.report({"step_seconds": seconds})


def packing(args, device: str) -> None:
    """Trials/hour for k = 1, 2, 4 trials sharing one device through fractional resources."""
    import ray
    from ray import tune

    resource = "gpu" if device == "cuda" else "cpu"
    ray.init(num_gpus=1 if device == "cuda" else 0, num_cpus=os.cpu_count(),
             include_dashboard=False, log_to_driver=False)
    print(f"{'packed':>6s} {'trials':>7s} {'wall s':>8s} {'trials/hour':>12s} {'vs 1':>6s}")
    base = None
    try:
        for k in args.pack:
            fraction = 1.0 / k
            cpus = max(os.cpu_count() / k, 0.1) if device == "cuda" else fraction
            res = {"cpu": cpus, "gpu": fraction} if resource == "gpu" else {"cpu": cpus}
            trainable = tune.with_resources(packed_trial, res)
            config = {"args": vars(args), "device": device, "fraction": fraction,
                      "steps": args.trial_steps, "i": tune.grid_search(list(range(args.trials)))}
            start = time.perf_counter()
            tune.Tuner(trainable, param_space=config,
                       tune_config=tune.TuneConfig(max_concurrent_trials=k),
                       run_config=tune.RunConfig(verbose=0, storage_path=args.storage)).fit()
            wall = time.perf_counter() - start
            per_hour = args.trials / wall * 3600
            base = base or per_hour
            print(f"{k:6d} {args.trials:7d} {wall:8.1f} {per_hour:12.0f} {per_hour / base:5.2f}x",
                  flush=True)
    finally:
        ray.shutdown()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--length", type=int, default=256, help="interactions per window")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--vocab", type=int, default=10000)
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation too)")
    p.add_argument("--trials", type=int, default=8, help="trials per packing level")
    p.add_argument("--trial-steps", type=int, default=200)
    p.add_argument("--pack", default="1,2,4", help="trials per GPU to compare")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--storage", default=os.path.abspath("runs/gpu_training"),
                   help="Ray Tune storage_path for the packing runs")
    p.add_argument("--smoke-test", action="store_true",
                   help="tiny shapes on CPU, 'eager' compile backend, 2 trials packed 2 per CPU")
    args = p.parse_args(argv)
    args.pack = [int(k) for k in str(args.pack).split(",")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke_test:
        args.depth, args.length, args.d_model, args.heads, args.batch = 1, 8, 16, 2, 4
        args.vocab, args.steps, args.warmup, args.trials, args.trial_steps = 50, 2, 1, 2, 2
        args.pack, args.compile_backend, device = [2], "eager", "cpu"
    elif device != "cuda":
        sys.exit("gpu_training: CUDA is not available (torch.cuda.is_available() is False), "
                 "so nothing was measured. Run it on a GPU machine; --smoke-test runs the code "
                 "paths on CPU at tiny size.")
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (smoke test)"
    print(f"device: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}; depth "
          f"{args.depth}, L={args.length}, d={args.d_model}, {args.heads} heads, batch "
          f"{args.batch}", flush=True)
    throughput(args, device)
    packing(args, device)


if __name__ == "__main__":
    main()
