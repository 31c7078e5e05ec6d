"""Environment variables set for the length of a block, then put back as they were."""

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def environ_set(values: dict[str, str | None]) -> Iterator[None]:
    """Set each variable (None: unset it) inside the block; afterwards every one is back to its
    value before, or unset again if it was unset, whatever the block raised."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        _apply(values)
        yield
    finally:
        _apply(saved)


def _apply(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
