"""Keep freed memory in the process, so that large tensors do not page-fault each step.

A training step on the CPU allocates and frees tens of tensors of 5 to 20 MB (activations,
their gradients, the normalised batch). glibc's malloc gives blocks of that size back to the
kernel when they are freed (``munmap``, or trimming the heap top), so the next step's
tensors touch fresh pages: each 4 KiB page is one page fault, about 20,000 per step of
the autoencoder at batch 128, a fifth of the step's time on this VM
(``docs/benchmarks.md``). This is the problem Intel's and PyTorch's CPU tuning guides
solve by preloading jemalloc or TCMalloc; glibc can do the same through ``mallopt``:

- ``M_MMAP_THRESHOLD`` 32 MiB (glibc's maximum): blocks up to 32 MiB come from the heap
  instead of their own mapping, and the threshold stops adapting;
- ``M_TRIM_THRESHOLD`` 1 GiB: free memory at the top of the heap is kept for reuse.

The process then keeps its peak heap (a few hundred MB for stage one) until it exits.
Elsewhere than glibc (macOS, musl) this does nothing. ``LYMPH_MALLOC_TUNING=0`` turns it
off.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as the module doc says (once per process); True if applied."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("LYMPH_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this interpreter runs on
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    return _done
