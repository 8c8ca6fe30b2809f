"""The files of a reczoo dataset: finding them, and naming the file and row a value came from.

`SourceLog` is the InteractionLog that the reczoo readers (x1 CSVs, x2 parquet) return: read
from several files, its errors name the file and data row an interaction came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from malloc_ray.data.sources.interactions import InteractionLog
from malloc_ray.errors import InputError

X1_FILES = ("train.csv", "test.csv")  # BARS ships no valid.csv (valid_data is test.csv)


@dataclass
class SourceLog(InteractionLog):
    """An InteractionLog read from several files: errors about interaction i name the file
    and data row it came from (`origin[i]` is its row counted over all files; None: i)."""

    parts: tuple[tuple[str, int], ...] = ()  # (file, data rows) in reading order
    origin: np.ndarray | None = None

    def locate(self, i: int) -> tuple[str | None, int | None]:
        row = int(i if self.origin is None else self.origin[i])
        for file, rows in self.parts:
            if row < rows:
                return file, row + 1
            row -= rows
        return None, None


def x1_files(path: str | Path, files) -> list[Path]:
    """A CSV file as given, or the named files inside a dataset directory."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError("no such file or directory", file=str(path))
    if not files:
        raise InputError("no files to read", key="files")
    return dataset_files(path, files)


def dataset_files(root: Path, files) -> list[Path]:
    """The named files inside the dataset directory `root`, each checked to exist."""
    found = [root / name for name in files]
    for file in found:
        if not file.is_file():
            raise InputError(f"no such file in the dataset directory (reading: "
                             f"{', '.join(files)})", file=str(file))
    return found


def describe_files(files: list[Path]) -> str:
    """One path for messages: the file, or `dir/{a,b}` for several files of one directory."""
    if len(files) == 1:
        return str(files[0])
    return f"{files[0].parent}/{{{','.join(f.name for f in files)}}}"
