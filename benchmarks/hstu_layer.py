"""One HSTU layer in training and in a full forward, ours against the peer's, on CPU.

    python benchmarks/hstu_layer.py --peer-root PATH/TO/generative-recommenders
    python benchmarks/hstu_layer.py                 # ours only
    python benchmarks/hstu_layer.py --smoke-test    # tiny shapes, ours only unless --peer-root

Ours is `HSTUBlock(cfg, Native(cfg))` (d = 256, 8 heads of 32, N = 2048 tokens per user, no
dropout). The peer is the STU layer of meta-recsys/generative-recommenders (`STULayer`, its
PYTORCH kernels, the same d, heads and head size, causal, no target-aware mask), imported from
the work tree given by --peer-root. It prints, as peer/ours time ratios (> 1: we are faster):

  fwd+bwd          B users x N tokens, forward and backward (train mode)
  full forward     1 user x N tokens, inference mode (eval mode)

each the median over --reps, peer and ours timed alternately rep by rep so that a change of
load hits both. With --peak-memory it also runs each side in a fresh process and prints the
growth of its peak resident memory over the memory after setup (model, inputs) and one
warm-up call, for each phase.

The peer imports triton and torchrec at module level and calls three fbgemm ops on the PYTORCH
path; on a CPU machine without them, this script installs stand-ins of its own: modules whose
attributes are `MagicMock`s (never called on the PYTORCH path) and pure-torch versions of the
fbgemm ops (jagged <-> padded dense, complete cumsum). None of the peer's code is copied here.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from unittest import mock

import torch

D_MODEL, HEADS = 256, 8


# -- the peer, imported from its work tree --------------------------------------------------
class _MockModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = mock.MagicMock(name=f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _MockFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports of the given top-level packages (and below) with `_MockModule`s."""

    def __init__(self, roots):
        self.roots = set(roots)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _MockModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _fbgemm_ops():
    """Pure-torch fbgemm ops the peer's PYTORCH path calls, unless fbgemm_gpu is installed."""
    try:
        torch.ops.fbgemm.jagged_to_padded_dense
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("fbgemm", "DEF")
    lib.define("asynchronous_complete_cumsum(Tensor lengths) -> Tensor")
    lib.define("jagged_to_padded_dense(Tensor values, Tensor[] offsets, SymInt[] max_lengths, "
               "float padding_value=0.0) -> Tensor")
    lib.define("dense_to_jagged(Tensor dense, Tensor[] x_offsets, SymInt? total_L=None) "
               "-> (Tensor, Tensor[])")

    def cumsum(lengths):
        return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])

    def to_dense(values, offsets, max_lengths, padding_value=0.0):
        off, n = offsets[0], max_lengths[0]
        b = off.numel() - 1
        lengths = (off[1:] - off[:-1]).clamp(max=n)
        if bool((lengths == n).all()) and values.shape[0] == b * n:
            return values.view(b, n, *values.shape[1:])
        rows = []
        for i in range(b):
            part = values[int(off[i]):int(off[i]) + int(lengths[i])]
            pad = values.new_full((n - part.shape[0], *values.shape[1:]), padding_value)
            rows.append(torch.cat([part, pad]))
        return torch.stack(rows)

    def to_jagged(dense, x_offsets, total_L=None):
        off = x_offsets[0]
        b, n = dense.shape[:2]
        lengths = off[1:] - off[:-1]
        if bool((lengths == n).all()):
            return dense.reshape(b * n, *dense.shape[2:]), [off]
        return torch.cat([dense[i, :int(lengths[i])] for i in range(b)]), [off]

    for name, fn in (("asynchronous_complete_cumsum", cumsum),
                     ("jagged_to_padded_dense", to_dense), ("dense_to_jagged", to_jagged)):
        lib.impl(name, fn, "CompositeImplicitAutograd")
    _fbgemm_ops.lib = lib  # keep the registration alive


def peer_layer(peer_root: str):
    """The peer's STULayer on its PYTORCH kernels, at our shapes."""
    sys.path.insert(0, os.path.abspath(peer_root))
    missing = [r for r in ("triton", "torchrec") if importlib.util.find_spec(r) is None]
    finder = _MockFinder(missing)
    sys.meta_path.insert(0, finder)
    try:
        _fbgemm_ops()
        from generative_recommenders.common import HammerKernel
        from generative_recommenders.modules.stu import STULayer, STULayerConfig
    finally:
        sys.meta_path.remove(finder)
    layer = STULayer(STULayerConfig(
        embedding_dim=D_MODEL, num_heads=HEADS, hidden_dim=D_MODEL // HEADS,
        attention_dim=D_MODEL // HEADS, output_dropout_ratio=0.0, causal=True,
        target_aware=False, max_attn_len=None, use_group_norm=False), is_inference=False)
    layer.set_hammer_kernel(HammerKernel.PYTORCH)
    return layer


# -- the two sides, as callables ----------------------------------------------------------------
def our_layer(n: int):
    from malloc_ray.methods.native import Native
    from malloc_ray.model.hstu import HSTUBlock, HSTUConfig

    cfg = HSTUConfig(d_model=D_MODEL, num_heads=HEADS, num_layers=1, max_len=n // 2, dropout=0.0)
    return HSTUBlock(cfg, Native(cfg))


def our_calls(layer, n: int, b: int):
    torch.manual_seed(0)
    x = torch.randn(b, n, D_MODEL, requires_grad=True)
    pos = torch.arange(n)[None].expand(b, n)
    valid = torch.ones(b, n, dtype=torch.bool)
    x1, pos1, valid1 = torch.randn(1, n, D_MODEL), pos[:1], valid[:1]

    def train():
        layer.train()
        layer.zero_grad(set_to_none=True)
        layer(x, pos, valid).sum().backward()

    def full():
        layer.eval()
        with torch.inference_mode():
            layer(x1, pos1, valid1)

    return {"fwd+bwd": train, "full forward": full}


def peer_calls(layer, n: int, b: int):
    torch.manual_seed(0)
    x = torch.randn(b * n, D_MODEL, requires_grad=True)
    lengths = torch.full((b,), n, dtype=torch.long)
    offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
    x1, lengths1 = torch.randn(n, D_MODEL), lengths[:1]
    offsets1 = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths1)

    def train():
        layer.train()
        layer.zero_grad(set_to_none=True)
        layer(x=x, x_lengths=lengths, x_offsets=offsets, max_seq_len=n,
              num_targets=torch.zeros(b, dtype=torch.long)).sum().backward()

    def full():
        layer.eval()
        with torch.inference_mode():
            layer(x=x1, x_lengths=lengths1, x_offsets=offsets1, max_seq_len=n,
                  num_targets=torch.zeros(1, dtype=torch.long))

    return {"fwd+bwd": train, "full forward": full}


def alternate(fns, reps: int):
    """Median seconds of each callable, run in turn rep by rep after one warm-up each."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


# -- peak memory, one fresh process per side and phase ---------------------------------------
def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measure(a) -> None:
    """Child process: set up one side, run one phase once, print the peak RSS growth over the
    resident memory after setup (the kernel's high-water mark is reset after setup)."""
    torch.set_num_threads(a.threads)
    if a.side == "ours":
        calls = our_calls(our_layer(a.seq), a.seq, a.batch)
    else:
        calls = peer_calls(peer_layer(a.peer_root), a.seq, a.batch)
    calls[a.phase]()  # warm-up: lazy initialisation is not the phase's memory
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    base = _status_bytes("VmRSS")
    calls[a.phase]()
    print(json.dumps({"peak_growth": max(0, _status_bytes("VmHWM") - base)}))


def peak_memory(a, side: str, phase: str) -> int:
    cmd = [sys.executable, os.path.abspath(__file__), "--_measure", side, phase,
           "--seq", str(a.seq), "--batch", str(a.batch), "--threads", str(a.threads)]
    if a.peer_root:
        cmd += ["--peer-root", a.peer_root]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_growth"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer-root", help="work tree of meta-recsys/generative-recommenders")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per user (N)")
    ap.add_argument("--batch", type=int, default=8, help="users in fwd+bwd (B)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-train", action="store_true", help="only the full forward")
    ap.add_argument("--peak-memory", action="store_true",
                    help="also the peak memory of each side and phase (fresh processes)")
    ap.add_argument("--smoke-test", action="store_true", help="tiny shapes, one rep")
    ap.add_argument("--_measure", nargs=2, metavar=("SIDE", "PHASE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.smoke_test:
        a.seq, a.batch, a.reps = 64, 2, 1
    if a._measure:
        a.side, a.phase = a._measure
        _measure(a)
        return
    torch.set_num_threads(a.threads)
    ours = our_calls(our_layer(a.seq), a.seq, a.batch)
    theirs = peer_calls(peer_layer(a.peer_root), a.seq, a.batch) if a.peer_root else None
    phases = ["full forward"] if a.skip_train else ["fwd+bwd", "full forward"]
    print(f"torch {torch.__version__}, {a.threads} threads, {platform.machine()}; "
          f"d={D_MODEL} heads={HEADS} N={a.seq} B={a.batch} (fwd+bwd), 1 user (full forward); "
          f"median of {a.reps}")
    for phase in phases:
        if theirs is None:
            o, = alternate([ours[phase]], a.reps)
            print(f"{phase:13s} ours {o * 1e3:9.1f} ms")
        else:
            t, o = alternate([theirs[phase], ours[phase]], a.reps)
            print(f"{phase:13s} peer {t * 1e3:9.1f} ms   ours {o * 1e3:9.1f} ms   "
                  f"peer/ours {t / o:5.2f}x")
    if a.peak_memory:
        for phase in phases:
            mib = peak_memory(a, "ours", phase) / 2**20
            line = f"{phase:13s} peak memory growth: ours {mib:7.1f} MiB"
            if a.peer_root:
                line += f"   peer {peak_memory(a, 'peer', phase) / 2**20:7.1f} MiB"
            print(line)


if __name__ == "__main__":
    main()
