"""Blocked HSTU pointwise attention: the training path, and the no-grad path for long inputs.

`hstu.pointwise_attention_reference` materialises several (B, H, Nq, Nk) tensors and autograd
keeps them until backward. Here the queries are processed in blocks of rows, so that only one
block of scores, (Bc, H, rows, keys), exists at a time, and `PointwiseAttention` (a
`torch.autograd.Function`) saves only q, k, v, bias and mask: backward recomputes the block's
scores instead of storing them.

The mask also tells which key columns a block needs: a block of queries skips the key columns
nobody in it sees (under the causal mask, every key after the block), and multiplies by the mask
only on the columns some row of the block does not see (the diagonal tile, under the causal
mask). Skipped weights are exactly 0 in the reference (SiLU(.) * 0). The forward runs the
reference's ops in its order on each block, so with one block (short inputs: every key, the
reference's matmul shapes) it is bitwise the reference; with several blocks the matmuls over a
shorter key range may round differently. Backward equals autograd through the reference up to
rounding. `tests/test_fast_attention.py` checks values and gradients against the reference in
fp32.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

# Budget of one block of scores, in elements: (batch chunk) x H x rows x key columns.
BLOCK_ELEMENTS = 1 << 20   # 4 MiB of fp32, one core's L2 on the project's machine
MIN_ROWS = 16
SKEW_ROWS = 128   # rows per chunk of the relative bias' gradient (ToeplitzExpand)


def supported(q, k, v, bias, mask) -> bool:
    """The inputs this module handles; everything else goes to the reference. CPU only: it
    was written and measured for the CPU machine (on a GPU its many small blocks are many
    kernel launches, unmeasured, so GPUs keep the reference)."""
    if q.device.type != "cpu":
        return False
    if not (q.dim() == k.dim() == v.dim() == bias.dim() == mask.dim() == 4):
        return False
    if mask.dtype != torch.bool or not (q.dtype == k.dtype == v.dtype == bias.dtype):
        return False
    if not q.dtype.is_floating_point or q.shape[-2] == 0 or k.shape[-2] == 0:
        return False
    b, h, nq, dh = q.shape
    nk = k.shape[-2]
    if k.shape != (b, h, nk, dh) or v.shape[:3] != (b, h, nk):
        return False
    for t in (bias, mask):
        if t.shape[0] not in (1, b) or t.shape[1] not in (1, h) or t.shape[2:] != (nq, nk):
            return False
    return True


def _plan(mask: torch.Tensor, rows: int):
    """Per block of query rows: (q0, q1, ks, ke, m0, m1).

    Keys [ks, ke) are those some query of the block sees in some batch row/head; on keys outside
    [m0, m1) every query of the block sees every key (no mask multiply needed there).
    An empty key range (ks == ke) means the block's output is 0.
    """
    flat = mask.reshape(-1, *mask.shape[-2:])
    seen_any, seen_all = flat.any(0), flat.all(0)   # (Nq, Nk)
    nq, nk = mask.shape[-2:]
    if rows >= nq:
        # One block: all the keys, so that the matmuls have the reference's shapes and the
        # forward is bitwise the reference's (methods compare their rows with Native's exactly)
        cols = (~seen_all.all(0)).nonzero()
        m0, m1 = (int(cols[0]), int(cols[-1]) + 1) if cols.numel() else (0, 0)
        return [(0, nq, 0, nk, m0, m1)]
    # per block of rows, which columns some row sees / every row sees: a few whole-tensor ops
    # (not a few per block: each is a fork/join of the threads)
    blocks = -(-nq // rows)
    pad = blocks * rows - nq
    block_any = F.pad(seen_any, (0, 0, 0, pad), value=False).view(blocks, rows, nk).any(1)
    block_all = F.pad(seen_all, (0, 0, 0, pad), value=True).view(blocks, rows, nk).all(1)
    cols = torch.arange(nk, device=mask.device).expand(blocks, nk)
    big, small = torch.full_like(cols, nk), torch.full_like(cols, -1)
    first = torch.where(block_any, cols, big).amin(1)
    last = torch.where(block_any, cols, small).amax(1)
    # columns of [ks, ke) that some row does not see (nobody's, too: their weights must be 0)
    inside = (cols >= first[:, None]) & (cols <= last[:, None])
    partial = inside & ~block_all
    first_p = torch.where(partial, cols, big).amin(1)
    last_p = torch.where(partial, cols, small).amax(1)
    plan = []
    for i, (ks, ke, m0, m1) in enumerate(zip(first.tolist(), last.tolist(), first_p.tolist(),
                                             last_p.tolist())):
        q0, q1 = i * rows, min((i + 1) * rows, nq)
        if ke < 0:
            plan.append((q0, q1, 0, 0, 0, 0))
        elif m1 < 0:
            plan.append((q0, q1, ks, ke + 1, ks, ks))
        else:
            plan.append((q0, q1, ks, ke + 1, m0, m1 + 1))
    return plan


def _sizes(b, h, nq, nk):
    """Batch chunk and rows per block so that one block of scores is about BLOCK_ELEMENTS."""
    per_row = h * nk
    rows = max(MIN_ROWS, BLOCK_ELEMENTS // (b * per_row))
    if rows >= nq:
        return b, nq
    chunk = b if rows > MIN_ROWS else max(1, BLOCK_ELEMENTS // (MIN_ROWS * per_row))
    return min(b, chunk), max(MIN_ROWS, BLOCK_ELEMENTS // (min(b, chunk) * per_row))


# -- heads on threads ---------------------------------------------------------------------
# A block is a few small ops; with intra-op parallelism each one is a fork/join of all
# threads, which costs dearly when other processes share the cores (a thread descheduled at a
# join stalls the op). So with several threads each head is a task, run single-threaded on a
# pool of one thread per torch thread: the tasks never wait for each other, and a thread that
# is descheduled leaves the remaining heads to the others.
THREADS: int | None = None   # None: torch.get_num_threads()
MAX_ROWS = 128               # rows per block when the heads are tasks (more blocks to skip)
_POOLS: dict[int, ThreadPoolExecutor] = {}


def _groups(h: int, bias, need_bias: bool = False):
    """[(h0, h1)]: the head ranges run as separate tasks (one range: run inline)."""
    shared_grad = need_bias and bias.shape[1] == 1   # every head adds into one bias gradient
    if _threads() <= 1 or h == 1 or bias.device.type != "cpu" or shared_grad:
        return [(0, h)]
    return [(i, i + 1) for i in range(h)]


def _threads() -> int:
    return THREADS if THREADS is not None else torch.get_num_threads()


def _run(work, groups):
    """work(h0, h1) for each head range: inline for one, else as tasks on the pool."""
    if len(groups) == 1:
        work(*groups[0])
        return
    n = min(_threads(), len(groups))
    pool = _POOLS.get(n)
    if pool is None:
        pool = _POOLS[n] = ThreadPoolExecutor(n, "malloc-ray-attn")
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()
    threads = torch.get_num_threads()

    def task(h0, h1):
        torch.set_num_threads(1)
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                work(h0, h1)
        finally:
            torch.set_num_threads(threads)

    for f in [pool.submit(task, h0, h1) for h0, h1 in groups]:
        f.result()


def _heads(t, h0, h1):
    return t if t.shape[1] == 1 else t[:, h0:h1]


def _bat(t, b0, b1):
    return t if t.shape[0] == 1 else t[b0:b1]


def _scores(q, k, bias, mask, divisor, b0, b1, q0, q1, ks, ke, m0, m1, silu_inplace):
    """Block of scores s = q k^T + bias, and w = SiLU(s) / divisor * mask, the reference's
    ops in its order (w is s, overwritten, when asked)."""
    s = torch.matmul(q[b0:b1, :, q0:q1], k[b0:b1, :, ks:ke].transpose(-1, -2))
    s += _bat(bias, b0, b1)[:, :, q0:q1, ks:ke]
    w = F.silu(s, inplace=True) if silu_inplace else F.silu(s)
    if divisor != 1.0:
        w /= divisor
    if m1 > m0:
        w[..., m0 - ks:m1 - ks] *= _bat(mask, b0, b1)[:, :, q0:q1, m0:m1]
    return s, w


def _layout(q, k, groups):
    b, h, nq, _ = q.shape
    chunk, rows = _sizes(b, max(h1 - h0 for h0, h1 in groups), nq, k.shape[-2])
    if len(groups) > 1 and rows > MAX_ROWS:
        rows = MAX_ROWS
    return chunk, rows


def _forward_heads(q, k, v, bias, mask, divisor, out, plan, chunk):
    b = q.shape[0]
    for b0 in range(0, b, chunk):
        b1 = min(b0 + chunk, b)
        for q0, q1, ks, ke, m0, m1 in plan:
            if ke == ks:
                continue
            _, w = _scores(q, k, bias, mask, divisor, b0, b1, q0, q1, ks, ke, m0, m1, True)
            torch.matmul(w, v[b0:b1, :, ks:ke], out=out[b0:b1, :, q0:q1])


def forward_blocked(q, k, v, bias, mask, divisor: float, layout=None) -> torch.Tensor:
    """The attention output without saving anything (no autograd)."""
    b, h, nq, _ = q.shape
    groups = _groups(h, bias)
    if layout is None:
        chunk, rows = _layout(q, k, groups)
        layout = (groups, chunk, _plan(mask, rows))
    groups, chunk, plan = layout
    out = q.new_zeros(b, h, nq, v.shape[-1])

    def work(h0, h1):
        _forward_heads(q[:, h0:h1], k[:, h0:h1], v[:, h0:h1], _heads(bias, h0, h1),
                       _heads(mask, h0, h1), divisor, out[:, h0:h1], plan, chunk)

    _run(work, groups)
    return out


def _backward_heads(q, k, v, bias, mask, g, dq, dk, dv, dbias, plan, chunk):
    b, h = q.shape[:2]
    bias_bcast = bias.shape[0] == 1 and b > 1
    heads_bcast = bias.shape[1] == 1 and h > 1
    for b0 in range(0, b, chunk):
        b1 = min(b0 + chunk, b)
        for q0, q1, ks, ke, m0, m1 in plan:
            if ke == ks:
                continue
            s, w = _scores(q, k, bias, mask, 1.0, b0, b1, q0, q1, ks, ke, m0, m1, False)
            g_blk = g[b0:b1, :, q0:q1]
            if dv is not None:
                dv[b0:b1, :, ks:ke] += torch.matmul(w.transpose(-1, -2), g_blk)
            del w
            dw = torch.matmul(g_blk, v[b0:b1, :, ks:ke].transpose(-1, -2))
            if m1 > m0:
                dw[..., m0 - ks:m1 - ks] *= _bat(mask, b0, b1)[:, :, q0:q1, m0:m1]
            ds = torch.ops.aten.silu_backward.grad_input(dw, s, grad_input=s)
            del dw
            if dq is not None:
                torch.matmul(ds, k[b0:b1, :, ks:ke], out=dq[b0:b1, :, q0:q1])
            if dk is not None:
                dk[b0:b1, :, ks:ke] += torch.matmul(ds.transpose(-1, -2), q[b0:b1, :, q0:q1])
            if dbias is not None:
                red = ds.sum(0, keepdim=True) if bias_bcast else ds
                if heads_bcast:
                    red = red.sum(1, keepdim=True)
                _bat(dbias, b0, b1)[:, :, q0:q1, ks:ke] += red


class PointwiseAttention(torch.autograd.Function):
    """out = (SiLU(q k^T + bias) / divisor * mask) v, blocked; backward recomputes the scores."""

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, divisor: float):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        groups = _groups(q.shape[1], bias, need_bias=bias.requires_grad)
        chunk, rows = _layout(q, k, groups)
        layout = (groups, chunk, _plan(mask, rows))
        ctx.save_for_backward(q, k, v, bias, mask)
        ctx.divisor, ctx.layout = divisor, layout
        return forward_blocked(q, k, v, bias, mask, divisor, layout)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias, mask = ctx.saved_tensors
        need_q, need_k, need_v, need_bias = ctx.needs_input_grad[:4]
        groups, chunk, plan = ctx.layout
        g = (grad_out / ctx.divisor).contiguous()
        dq = torch.zeros_like(q) if need_q else None
        dk = torch.zeros_like(k) if need_k else None
        dv = torch.zeros_like(v) if need_v else None
        # The bias gradient is summed over the batch (and heads) it was broadcast over.
        dbias = bias.new_zeros(bias.shape) if need_bias else None

        def part(t, h0, h1):
            return None if t is None else t[:, h0:h1]

        def work(h0, h1):
            _backward_heads(q[:, h0:h1], k[:, h0:h1], v[:, h0:h1], _heads(bias, h0, h1),
                            _heads(mask, h0, h1), g[:, h0:h1], part(dq, h0, h1), part(dk, h0, h1), part(dv, h0, h1),
                            None if dbias is None else _heads(dbias, h0, h1), plan, chunk)

        _run(work, groups)
        return dq, dk, dv, dbias, None, None


def pointwise_attention_fast(q, k, v, bias, mask, divisor: float) -> torch.Tensor:
    """Blocked attention: autograd through `PointwiseAttention` when a gradient is needed."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias)):
        return PointwiseAttention.apply(q, k, v, bias, mask, divisor)
    return forward_blocked(q.contiguous(), k.contiguous(), v.contiguous(), bias, mask, divisor)


# -- relative bias on consecutive positions -------------------------------------------------
def toeplitz(by_diagonal, nq: int, nk: int) -> torch.Tensor:
    """(H, Nq + Nk - 1) -> (H, Nq, Nk): out[h, i, j] = by_diagonal[h, i - j + Nk - 1]."""
    # a Hankel view of the reversed diagonals (row i' is row nq - 1 - i'), rows reversed
    return by_diagonal.flip(-1).unfold(-1, nk, 1).flip(-2)


class ToeplitzExpand(torch.autograd.Function):
    """(H, Nq + Nk - 1) -> (1, H, Nq, Nk): bias[h, i, j] = by_diagonal[h, i - j + Nk - 1].

    The bias of queries and keys at consecutive positions depends on i - j only. Its gradient
    is then a sum along each diagonal, taken here by writing the gradient into a buffer with
    each row shifted by one more column (a strided view) and summing the columns: no gather
    or scatter over the Nq * Nk indices.
    """

    @staticmethod
    def forward(ctx, by_diagonal, nq: int, nk: int):
        ctx.shape = (nq, nk)
        return toeplitz(by_diagonal, nq, nk).unsqueeze(0)

    @staticmethod
    def backward(ctx, grad):
        nq, nk = ctx.shape
        grad = grad[0]
        h = grad.shape[0]
        out = grad.new_zeros(h, nq + nk - 1)   # column t: diagonal i - j = t - (nk - 1)
        rows = max(1, min(nq, SKEW_ROWS))
        width = rows + nk - 1
        skew = grad.new_empty(h, rows, width)  # one small scratch, reused for every chunk
        for r0 in range(0, nq, rows):
            r = min(rows, nq - r0)
            skew.zero_()
            # grad[r0 + i, j] goes to column (r - 1 - i) + j, i.e. diagonal (r0 + i) - j
            skew.as_strided((h, r, nk), (rows * width, width - 1, 1), r - 1).copy_(
                grad[:, r0:r0 + r])
            # column c holds diagonal r0 + r - 1 - c, i.e. t = r0 + r - 1 - c + nk - 1
            sums = skew[:, :, :r + nk - 1].sum(1).flip(-1)  # t = r0 .. r0 + r + nk - 2
            out[:, r0:r0 + r + nk - 1] += sums
        return out, None, None
