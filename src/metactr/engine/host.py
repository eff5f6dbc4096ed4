"""The host's memory allocator: keep freed memory for reuse instead of handing it back each step.

A CPU training step allocates and frees the same tensors every step; many are 0.1-2 MB (DIN's
packed attention activations are 5,600 x 64 floats, 1.4 MB). glibc's malloc serves such blocks
with ``mmap`` or returns the top of its heap to the kernel when they are freed (its dynamic
``M_MMAP_THRESHOLD`` / ``M_TRIM_THRESHOLD``), so the next step touches fresh pages and pays a
page fault per 4 KB. On this project's 2-core AMD EPYC (Zen 4) host, DIN's training step at 2
threads took 3.6x its MLP's time instead of 3.9-4.1x (about 10% faster), DeepFM's no measurable
difference (``benchmarks/profile_step.py`` with ``METACTR_MALLOC_RETAIN=0`` / ``1``, in
``docs/training.md``); a Dice layer alone, forward + backward on 5,600 x 64 with one thread (a
scratch probe, not committed, another job on the other core), took 438 page faults and 3.6 ms
against 5 faults and 1.7 ms. The usual cure is ``LD_PRELOAD`` of jemalloc or tcmalloc (PyTorch's CPU
tuning guide); ``retain_freed_memory`` does the same for glibc from inside the process with two
``mallopt`` settings: blocks below 64 MB come from the heap, and up to 1 GB of freed heap is kept.
The resident size then stays near the run's peak instead of falling between steps; the peak
itself does not grow.

Called by the Trainer and by ``predict_proba`` on the CPU; ``METACTR_MALLOC_RETAIN=0`` leaves the
allocator alone. Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 1 << 30
_lock = threading.Lock()
_state: bool | None = None  # None: not tried yet


def retain_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory (once per process); whether it is set."""
    global _state
    if _state is not None:
        return _state
    with _lock:
        if _state is None:
            _state = _apply()
    return _state


def _apply() -> bool:
    if os.environ.get("METACTR_MALLOC_RETAIN", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        gnu = libc.gnu_get_libc_version  # glibc only: musl and macOS have no such function
    except (OSError, AttributeError):
        return False
    gnu.restype = ctypes.c_char_p
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
