"""The progress bar of the streaming readers (reczoo x1 CSVs, LongCTR x2 parquet), drawn by tqdm.

Readers report progress to a `Progress` callback (the CLI prints to stderr, a study writes its
log), so the bar is text lines, about one per tenth of the input: lines suit logs, and
terminals too. The callback None draws nothing.
"""

from __future__ import annotations

import math
from typing import Callable

import tqdm

Progress = Callable[[str], None]

BAR_FORMAT = ("{desc} [{bar:20}] {percentage:3.0f}% of {total_fmt}B in {elapsed} "
              "({rate_fmt}{postfix})")


class ByteProgress:
    """Progress over the bytes of a reader's input files.

    `advance(nbytes, rows)` after each batch, with the bytes of input the batch came from (the
    reader knows them: a CSV block's size, a parquet batch's share of its file), then `close()`,
    which draws the 100% line."""

    STEPS = 10

    def __init__(self, name: str, total_bytes: int, progress: Progress | None):
        total = max(total_bytes, 1)
        self.rows = 0
        self.bar = tqdm.tqdm(
            total=total, desc=name, unit="B", unit_scale=True, bar_format=BAR_FORMAT,
            ascii="-#", file=_Lines(progress), disable=progress is None, leave=False,
            # a line when a tenth more is read; never one of tqdm's timed refreshes, nor at 0%
            miniters=max(total // self.STEPS, 1), mininterval=0, maxinterval=math.inf,
            delay=1e-9)

    def advance(self, nbytes: int, rows: int) -> None:
        self.rows += rows
        if self.bar.disable:
            return
        self.bar.set_postfix_str(self._rows(), refresh=False)
        self.bar.update(max(0, min(nbytes, self.bar.total - self.bar.n)))

    def close(self) -> None:
        """Draw the 100% line (the input is all read) and release the bar."""
        if not self.bar.disable:
            self.bar.set_postfix_str(self._rows(), refresh=False)
            self.bar.update(self.bar.total - self.bar.n)
            if self.bar.last_print_n < self.bar.n:  # the last tenth drew no line yet
                self.bar.refresh()
        self.bar.close()

    def abandon(self) -> None:
        """Release the bar without a last line (reading failed)."""
        self.bar.close()

    def _rows(self) -> str:
        seconds = self.bar.format_dict["elapsed"]
        return f"{self.rows:,} rows, {self.rows / max(seconds, 1e-9):,.0f} rows/s"


class _Lines:
    """tqdm's output stream: each redraw ('\\r' + bar) becomes one line for the callback."""

    def __init__(self, say: Progress | None):
        self.say = say

    def write(self, text: str) -> None:
        for part in text.split("\r"):
            line = part.strip()
            if line and self.say is not None:
                self.say(line)

    def flush(self) -> None:
        pass
