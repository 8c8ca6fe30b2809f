"""Conversion and loader throughput at KuaiVideo_x1 size (13,661,383 rows).

Generates KuaiVideo_x1-format train.csv/test.csv (exact header, files sorted by timestamp,
pos_items/neg_items = the EARLIEST 100 earlier clicks/non-clicks of the user, item ids up to
3.2 M as in the real files) into a work directory, then in a fresh process times

  * conversion: `prepare("kuaivideo_x1", ..., max_seq_len=1024)` (read + rebuild + write),
    reporting rows/s and the process's peak memory (the CSVs are far larger than it),
  * loader throughput: `local_batches` over the train split at max_len 1024 and 128
    (samples/s and window tokens/s).

    python benchmarks/conversion.py --workdir /tmp/kuai-bench            # full size
    python benchmarks/conversion.py --workdir /tmp/kb --rows 1000000     # a quick look

Figures and the machine they came from: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

KUAI_ROWS, KUAI_TEST_ROWS, KUAI_USERS = 13_661_383, 2_730_291, 10_000
HEADER = "timestamp,user_id,item_id,is_click,is_like,is_follow,pos_items,neg_items\n"
ITEM_IDS = 3_242_317  # item_emb vocabulary of KuaiVideo_x1: ids run this high
CLICK_RATE = 0.17  # the paper's KuaiVideo positive rate
CAP = 100
LENGTH_SIGMA = 1.8  # 10,000 users: mean of min(rows, 1024) = 428 (paper: 416)
CHUNK = 200_000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--rows", type=int, default=KUAI_ROWS)
    p.add_argument("--users", type=int, default=KUAI_USERS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loader-seconds", type=float, default=20.0,
                   help="time spent iterating batches per max_len")
    p.add_argument("--phase", choices=["all", "generate", "measure"], default="all")
    p.add_argument("--smoke-test", action="store_true",
                   help="20,000 rows of 50 users under WORKDIR/smoke: checks the code path")
    args = p.parse_args()
    if args.smoke_test:  # its own subfolder, so a full-size input there is never reused
        args.workdir, args.rows, args.users = args.workdir / "smoke", 20_000, 50
        args.loader_seconds = min(args.loader_seconds, 1.0)
    raw = args.workdir / "KuaiVideo_x1"
    if args.phase in ("all", "generate") and not (raw / "test.csv").is_file():
        t = time.perf_counter()
        generate(raw, args.rows, args.users, args.seed)
        print(f"generated {args.rows:,} rows in {time.perf_counter() - t:.0f}s "
              f"({sum(f.stat().st_size for f in raw.iterdir()) / 1e9:.2f} GB)", flush=True)
    if args.phase == "all":  # measure in a fresh process: its peak memory is conversion's own
        return subprocess.call([sys.executable, __file__, "--workdir", str(args.workdir),
                                "--loader-seconds", str(args.loader_seconds),
                                "--phase", "measure"])
    if args.phase == "measure":
        print(json.dumps(measure(raw, args.workdir / "dataset", args.loader_seconds), indent=2))
    return 0


# -- the input -------------------------------------------------------------------------------
def generate(out: Path, rows: int, users: int, seed: int) -> None:
    """Rows in time order; users interleaved at random; ~1,366 rows per user on average with a
    log-normal spread wide enough that capping at 1024 leaves the paper's average length (416);
    the last fifth of the timeline is test.csv."""
    rng = np.random.default_rng(seed)
    counts = rng.lognormal(0, LENGTH_SIGMA, users)
    counts = np.maximum(3, np.floor(counts / counts.sum() * rows)).astype(np.int64)
    counts[np.argmax(counts)] += rows - counts.sum()
    user_of_row = rng.permutation(np.repeat(np.arange(users), counts))
    user_ids = [str(u) for u in np.sort(rng.choice(20 * users, users, replace=False))]
    state = _HistoryState(users)
    out.mkdir(parents=True, exist_ok=True)
    test_rows = round(rows * KUAI_TEST_ROWS / KUAI_ROWS)
    with open(out / "train.csv", "w") as train, open(out / "test.csv", "w") as test:
        train.write(HEADER)
        test.write(HEADER)
        for lo in range(0, rows, CHUNK):
            hi = min(rows, lo + CHUNK)
            text = _lines(rng, lo, user_of_row[lo:hi], user_ids, state)
            split = max(0, min(hi, rows - test_rows) - lo)
            train.write("".join(text[:split]))
            test.write("".join(text[split:]))


class _HistoryState:
    """Per user: the text of its earliest 100 clicks / non-clicks so far, and their counts."""

    def __init__(self, users: int):
        self.text = [["", ""] for _ in range(users)]
        self.count = [[0, 0] for _ in range(users)]


def _lines(rng, first_ts: int, users: np.ndarray, user_ids: list[str],
           state: _HistoryState) -> list[str]:
    n = len(users)
    items = rng.integers(1, ITEM_IDS, n).astype(str).tolist()
    clicks = (rng.random(n) < CLICK_RATE).astype(np.int64).tolist()
    likes = ((rng.random(n) < 0.05) & (np.array(clicks) == 1)).astype(np.int64).tolist()
    follows = (rng.random(n) < 0.005).astype(np.int64).tolist()
    lines = []
    for k, (u, item, click) in enumerate(zip(users.tolist(), items, clicks)):
        text, count = state.text[u], state.count[u]
        lines.append(f"{first_ts + k},{user_ids[u]},{item},{click},{likes[k]},{follows[k]},"
                     f"{text[1]},{text[0]}\n")
        if count[click] < CAP:  # slot 1: clicks (pos_items), slot 0: non-clicks (neg_items)
            text[click] = item if not count[click] else f"{text[click]}^{item}"
            count[click] += 1
    return lines


# -- the measurements ------------------------------------------------------------------------
def measure(raw: Path, out: Path, loader_seconds: float) -> dict:
    from malloc_ray.data.loader import load_dataset, local_batches
    from malloc_ray.data.prepare import prepare

    stamps: list[tuple[float, str]] = []

    def progress(msg: str) -> None:
        stamps.append((time.perf_counter(), msg))
        print(msg, file=sys.stderr, flush=True)

    csv_bytes = sum(f.stat().st_size for f in raw.glob("*.csv"))
    t0 = time.perf_counter()
    meta = prepare("kuaivideo_x1", out, path=raw, max_seq_len=1024, overwrite=True,
                   progress=progress)
    total = time.perf_counter() - t0
    read_end, read_msg = next((t - t0, m) for t, m in stamps if m.startswith("read "))
    rows = int(read_msg.split()[1].replace(",", ""))  # "read N interactions of U users"
    report = {
        "csv_rows": rows, "csv_gb": round(csv_bytes / 1e9, 2),
        "convert_seconds": round(total, 1), "read_seconds": round(read_end, 1),
        "rows_per_second": round(rows / total), "read_rows_per_second": round(rows / read_end),
        "read_mb_per_second": round(csv_bytes / 1e6 / read_end),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "stats": meta["stats"], "splits": meta["splits"],
    }
    t = time.perf_counter()
    ds = load_dataset(out)
    report["load_dataset_seconds"] = round(time.perf_counter() - t, 1)
    for max_len in (1024, 128):
        report[f"loader_max_len_{max_len}"] = _loader_rate(ds, max_len, loader_seconds,
                                                            local_batches)
    return report


def _loader_rate(ds, max_len: int, seconds: float, local_batches) -> dict:
    """Shuffled train batches of 256 (targets only: one sample per train target)."""
    samples = tokens = 0
    t = time.perf_counter()
    for batch in local_batches(ds, "train", batch_size=256, max_len=max_len, shuffle=True,
                               loss_positions="last"):
        samples += len(batch["lengths"])
        tokens += int(batch["lengths"].sum())
        if time.perf_counter() - t > seconds:
            break
    elapsed = time.perf_counter() - t
    return {"samples_per_second": round(samples / elapsed),
            "window_tokens_per_second": round(tokens / elapsed), "samples": samples,
            "seconds": round(elapsed, 1)}


if __name__ == "__main__":
    sys.exit(main())
