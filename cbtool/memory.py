"""Memory that cannot be allocated: one line that names the option to lower, caught where the allocation fails."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from cbtool.errors import OutOfMemory

# What the allocators say when they refuse: torch's CPU allocator ("DefaultCPUAllocator: can't allocate memory"),
# its CUDA and MPS allocators (torch.OutOfMemoryError), the C++ "not enough memory" of a few kernels, and
# the same errors re-raised from a DataLoader worker.
_PHRASES = ("out of memory", "not enough memory", "defaultcpuallocator", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocator's refusal (not a bug that happens to mention memory)."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    return isinstance(error, RuntimeError) and any(phrase in str(error).lower() for phrase in _PHRASES)


@contextmanager
def memory_guard(option: str, value: int | None, hint: str = "") -> Iterator[None]:
    """Turn an allocator's refusal inside the block into ``OutOfMemory`` naming ``option`` (e.g. --batch-size) and
    its ``value`` (None: not known here)."""
    try:
        yield
    except (RuntimeError, MemoryError) as error:
        if not is_out_of_memory(error):
            raise
        at = f" at {option} {value}" if value is not None else ""
        raise OutOfMemory(f"out of memory{at}: lower {option}{hint}") from None
