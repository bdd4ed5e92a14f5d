"""The process's memory-allocator settings for CPU work: one named function, :func:`keep_freed_memory`, called by
every ``instdisc`` command (``cli/app.py``) and by the benchmarks. Covered by tests/test_allocator.py.

On a CPU every training step allocates the same large tensors again (one 256 x 3 x 96 x 96 float view is 28 MiB).
By default glibc hands large freed blocks back to the kernel (a block above a threshold that adapts between
128 KiB and 32 MiB is ``mmap``-ed and unmapped when freed; the heap is trimmed when more than twice that threshold
is free at its top), so the next step's allocation of the same size faults in fresh, zeroed pages, ~3 us each on
the 2-core VM. Training input from a 96 px image cache (``Batches.epoch``: two ``BatchAugment`` views of 256
images) took ~6,500 minor page faults per batch there and ran at ~2,000 samples/s; with freed memory kept for
reuse, ~0 faults and ~2,400 samples/s (same machine, same minute). jemalloc and tcmalloc, which PyTorch's
performance guide suggests preloading, keep freed memory by design; glibc does when told to with ``mallopt``.
Blocks of 32 MiB and more (glibc's largest allowed threshold; e.g. a 256-image view at 128 px and above) are still
mapped and unmapped each time.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

__all__ = ["keep_freed_memory", "MMAP_FROM", "KEEP_BYTES", "ENV_OFF"]

log = logging.getLogger(__name__)

MMAP_FROM = 32 << 20  # blocks from 32 MiB up are mmap-ed (the largest threshold glibc accepts on 64-bit), fixed
KEEP_BYTES = 512 << 20  # up to 512 MiB of freed memory at the top of the heap stays in the process
ENV_OFF = "INSTDISC_KEEP_FREED_MEMORY"  # set to 0 to leave the allocator as it is
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h> parameter numbers
_applied: int | None = None


def keep_freed_memory(keep: int = KEEP_BYTES, *, libc=None) -> bool:
    """Keep freed memory in the process for reuse: with glibc, blocks below :data:`MMAP_FROM` (32 MiB) always come
    from the heap, and up to ``keep`` bytes of freed memory at its top stay in the process instead of going back
    to the kernel.

    Returns True when the settings are in effect (now or from an earlier call with the same ``keep``); False on a
    C library other than glibc (macOS, musl: nothing is changed) or when the environment variable
    ``INSTDISC_KEEP_FREED_MEMORY`` is ``0``. The cost: the process keeps up to ``keep`` bytes it freed until it
    exits. Values are not changed by it. ``libc``: the library object to call (tests); default glibc itself.
    """
    global _applied
    if os.environ.get(ENV_OFF, "1").strip() == "0":
        return False
    real = libc is None
    if real and _applied == keep:
        return True
    if real:
        if platform.libc_ver()[0] != "glibc":
            return False
        name = ctypes.util.find_library("c") or "libc.so.6"
        try:
            libc = ctypes.CDLL(name)
        except OSError:
            return False
    # mallopt returns 1 on success, 0 on a value it refuses; a fixed threshold also ends glibc's adapting of both
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_FROM) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, int(keep)) == 1
    if ok and real:
        _applied = keep
        log.debug("allocator: blocks below %d bytes from the heap, up to %d freed bytes kept", MMAP_FROM, keep)
    return ok
