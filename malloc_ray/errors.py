"""One error type for bad user input, so the CLI can print it cleanly and exit non-zero.

Every message names where the problem is: a file and row, or a config key.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user (data file, config, CLI argument)."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 key: str | None = None):
        where = []
        if file is not None:
            where.append(str(file))
        if row is not None:
            where.append(f"row {row}")
        if key is not None:
            where.append(f"key '{key}'")
        self.file, self.row, self.key, self.message = file, row, key, message
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
