"""Keep freed host memory in the process instead of handing it back to the kernel at every step.

Why: a training step on the CPU allocates and frees the same large tensors every step
(activations, logits, gradients). glibc's malloc serves every block above its mmap threshold
(128 KiB at start, raised up to 32 MiB as it adapts) with a fresh ``mmap`` and returns it with
``munmap`` on free, and trims the top of its heap back to the kernel. The next step then
touches the same amount of brand-new memory, and the kernel zeroes and maps it one 4 KiB page
at a time. bench/allocator.py on this 2-core CPU (bare training loop, one thread, fresh
processes, medians of paired rounds): gpt2-124m in bf16 at context 64, batch 4 took ~215k page
faults and ~0.4 s of kernel time in each ~1.66 s step; with freed memory kept, ~300 faults and
no kernel time, 0.75x the step, for 7% more peak resident memory. A 25M model: ~9k faults and
16-19 ms of kernel time per ~1 s step, 0.97x; the 0.8M char model: 100-160 faults, 0.3 ms,
0.92x (both within this machine's spread between processes). Intel's PyTorch tuning guide
gives the same reason for preloading jemalloc or tcmalloc; this needs neither: two ``mallopt``
calls into the glibc already loaded raise the mmap threshold to 1 GiB and switch trimming off.

On CUDA the host's large allocations are batches and checkpoint staging, not the step's
tensors, and handing memory back is the better default there (``parallel.keep_host_memory``
``auto`` applies this on CPU runs only). It is process-wide and cannot be undone cleanly, so
it is applied once, before the model is built, and never reverted."""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h parameter numbers
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap and are reused
TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt's int takes: the heap top is never trimmed


def keep_freed_host_memory() -> bool:
    """Make glibc's malloc keep and reuse freed memory; returns whether it was applied (False on
    a libc other than glibc, e.g. macOS or musl, where this is left as it is)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
