"""Names and files the user hands us: safe path components, writable targets, YAML and parquet.

A name from a spec (study name, dataset key) becomes a directory or file name, so it must be
one plain path component: no separator, no `..`, nothing absolute. Every check raises
`InputError` naming the key or file, before anything is written.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from malloc_ray.errors import InputError

NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
NAME_RULE = "letters, digits, '_', '.' and '-' only, and not '.' or '..'"


def check_name(value, key: str, file: str | None = None) -> str:
    """`value` if it is a safe single path component, else an InputError naming `key`."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or value in (".", ".."):
        raise InputError(f"must be a name of {NAME_RULE}; got {value!r}", file=file, key=key)
    return value


def check_writable_dir(path: str | Path, key: str | None = None, file: str | None = None) -> None:
    """Fail now, not after a long read, when directory `path` could not be created or written.

    The nearest existing ancestor must be a directory we can create entries in; it is probed
    by creating (and removing) an empty directory, since `os.access` says yes to root even
    where the kernel refuses (/proc, read-only mounts)."""
    where = {"key": key, "file": file or (None if key else str(path))}
    ancestor = Path(path).expanduser().absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"cannot create it: {ancestor} is a file, not a directory",
                         **where)
    if not _probe(ancestor):
        raise InputError(f"cannot write there: {ancestor} is not writable", **where)


def _probe(directory: Path) -> bool:
    try:
        Path(tempfile.mkdtemp(prefix=".malloc-ray-probe-", dir=directory)).rmdir()
    except OSError:
        return False
    return True


def load_yaml(path: str | Path, what: str = "file"):
    """The parsed YAML of `path`; unreadable files and syntax errors are one-line InputErrors
    (PyYAML's own message spans several lines)."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"cannot read {what}: {exc.strerror}", file=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} is not UTF-8 text ({exc.reason})", file=str(path)) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or first_line(exc)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise InputError(f"not valid YAML: {problem}{where}", file=str(path)) from exc


def read_parquet(path: str | Path, columns: list[str] | None = None):
    """A pyarrow Table; a file that is not readable parquet is an InputError naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"not a readable parquet file ({first_line(exc)})",
                         file=str(path)) from exc


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line: errors we print are one line."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
