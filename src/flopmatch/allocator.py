"""Host memory allocator settings for flopmatch's processes (glibc malloc on Linux).

Why: PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a block above its mmap threshold
(128 KiB at start, raised dynamically up to 32 MiB as such blocks are freed) with a fresh ``mmap``, and gives the
top of its heap back to the system once more than its trim threshold (twice the mmap threshold) is free there. A
training step allocates and frees the same large activations every step (the (B*L, V) logits of the token
paradigms, 8 MiB at the cpu preset's batch), so both paths hand pages back to the kernel and fault them in again,
zeroed, at the next step: measured here, ~7,000 page faults (28 MiB) per masked-token step at depth 2, 20-25% of
its time. PyTorch's CPU performance guide recommends an allocator that keeps memory (jemalloc or tcmalloc through
``LD_PRELOAD``); that needs a system package and a launcher, so instead this sets glibc's own two knobs once per
process with ``mallopt``: a fixed mmap threshold of 32 MiB (glibc's largest) and a trim threshold of 1 GiB. After
the first step every step reuses the heap's pages. The price: up to 1 GiB of freed memory may stay with the process
instead of returning to the system; blocks over 32 MiB are still mapped and unmapped as before.

Left alone where it cannot apply or the user chose: not glibc, ``LD_PRELOAD`` set (another allocator may be in
use), or any ``MALLOC_*`` / ``GLIBC_TUNABLES`` malloc setting in the environment.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # bytes: glibc's HEAP_MAX_SIZE / 2 on 64-bit, the largest it accepts
TRIM_THRESHOLD = 1 << 30  # bytes (mallopt takes a C int)


def user_chose_allocator(env: dict[str, str] | None = None) -> bool:
    """Whether the environment already sets the allocator: LD_PRELOAD, a MALLOC_* variable or a glibc.malloc tunable."""
    env = os.environ if env is None else env
    return bool(env.get("LD_PRELOAD")) or any(k.startswith("MALLOC_") for k in env) or "glibc.malloc" in env.get("GLIBC_TUNABLES", "")


def tune_allocator() -> bool:
    """Set glibc malloc's mmap and trim thresholds for this process (module docstring); True if they were set.

    Idempotent and cheap; a no-op (False) off glibc or where :func:`user_chose_allocator`.
    """
    if user_chose_allocator():
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):  # raises off Linux/glibc
            return False
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError, ValueError):  # no confstr name, no libc symbol
        return False
