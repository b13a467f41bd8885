"""Functions the model-build child runs in tests (importable by name in a fork-server child)."""

from __future__ import annotations


def allocate(megabytes: int, _max_modules: int) -> int:
    """Touch `megabytes` of memory: past the child's RLIMIT_AS this is a MemoryError."""
    block = bytearray(megabytes * 1024 * 1024)
    return len(block)
